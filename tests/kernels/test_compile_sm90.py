"""The kernels as Inductor's generated code launches them (the ``triton_op`` forms) compile for
Hopper: Triton builds them for sm_90 on this machine, GPU or not. Inductor types a Python float
argument as fp64, where a plain launch passes fp32; a kernel that takes one into fp32-only math
fails to compile there, and only there (the first H200 run of the forms found such a failure)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.bench.test_sass import _has_ptxas


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton wheel carries no NVIDIA toolchain")
def test_traced_launches_compile_for_hopper():
    script = os.path.join(os.path.dirname(__file__), "compile_traced_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert out.stdout.count("compiled ") >= 4


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton wheel carries no NVIDIA toolchain")
def test_direct_launches_compile_for_hopper():
    """The launcher's direct launches with sizes of 1 (which Triton makes constants) compile for
    sm_90: a kernel of the training step's weight packing once failed there on a one-row weight,
    which the interpreter ran."""
    script = os.path.join(os.path.dirname(__file__), "compile_direct_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert "compiled _stack_pack_kernel ['N'" in out.stdout  # a one-row weight: N the constant 1
