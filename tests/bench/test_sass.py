"""``python -m bitfx.bench sass``: the decode kernels compiled for sm_90 on a machine without a
GPU (a subprocess: the test session runs Triton's interpreter, which replaces the compiler)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _has_ptxas() -> bool:
    import triton

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton wheel carries no NVIDIA toolchain")
def test_decode_kernels_compile_for_hopper_without_spilling():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bitfx.bench", "sass", "--models", "llama-1b"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| llama-1b")]
    assert len(rows) == 4 * 3 + 3  # four sites, three kernels each; attention, once split (two kernels)
    for model, site, kernel, warps, block, regs, stack, sass in (map(str.strip, r) for r in rows):
        assert 0 < int(regs) <= 255 and int(sass) > 100, (site, kernel)
        if kernel in ("dp4a GEMV", "front_gemv", "attention"):  # these hold their tiles in registers
            assert int(stack) == 0, (site, kernel, regs)
