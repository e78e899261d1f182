"""Triton kernels for bitfx (import name ``bitfx.kernels``).

Leaves of the package: they import torch and triton only. Each launcher checks its inputs,
allocates its outputs on the input's device and launches; the ``bitfx::`` ops in
:mod:`bitfx.ops` call them for CUDA tensors. Under ``TRITON_INTERPRET=1`` they also run on
CPU tensors, which is how the test suite checks them without a GPU.
"""
