"""Triton kernels for bitfx (import name ``bitfx.kernels``).

Leaves of the package: they import torch and triton only. Each launcher checks its inputs,
allocates its outputs on the input's device and launches; the ``bitfx::`` ops in
:mod:`bitfx.ops` call them for CUDA tensors. Under ``TRITON_INTERPRET=1`` they also run on
CPU tensors, which is how the test suite checks them without a GPU.
"""

if __name__ != "bitfx.kernels":
    # Imported as a top-level ``kernels``: a checkout's root is on sys.path (``python -m`` from
    # the checkout, pytest) and something asked for another package of that name (transformers
    # asks for the Hugging Face ``kernels`` package). Hand the import over to that package
    # where one is installed.
    def _hand_over(name: str) -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            # None installed: stay this empty package, as before (transformers probes for the
            # name with import_module and reads the version from its metadata, which it lacks).
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)

    _hand_over(__name__)
    del _hand_over
