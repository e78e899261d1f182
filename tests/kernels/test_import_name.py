"""A checkout's ``kernels/`` directory is ``bitfx.kernels``; run from the checkout's root
(``python -m``, pytest put the root on sys.path), a top-level ``import kernels`` must reach the
installed package of that name (transformers imports Hugging Face's ``kernels``), or fail
(none installed) stay an empty package, never bitfx's kernels with their submodules."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_top_level_kernels_is_not_bitfx():
    code = "import kernels, bitfx.kernels; print(kernels.__file__); print(bitfx.kernels.__name__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    own = os.path.join(ROOT, "kernels")
    try:  # a distribution named kernels (Hugging Face's), not a directory that happens to be on sys.path
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:
        assert run.returncode == 0, run.stderr
        first, second = run.stdout.split()
        assert not os.path.abspath(first).startswith(own + os.sep)
        assert second == "bitfx.kernels"
    else:  # an empty package: transformers' probe finds no version and moves on
        probe = "import kernels; print(sorted(n for n in vars(kernels) if not n.startswith('__')))"
        run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[]"
