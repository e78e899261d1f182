"""Shared test helpers: the device kernels run on, and float comparisons with stated tolerances."""

from __future__ import annotations

import torch

HAS_CUDA = torch.cuda.is_available()
# The Triton kernels run on the GPU when there is one, else in Triton's CPU interpreter.
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One unit in the last place, relative, of each output dtype: outputs are compared with a
# tolerance of a few of these (the float epilogue's rounding differs from the reference's).
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float, atol: float = 0.0) -> None:
    """|actual - expected| <= ulps * ULP[dtype] * |expected| + atol, NaN where expected is NaN."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    rtol = ulps * ULP[expected.dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol, equal_nan=True)

# The devices the ops run on: the CPU (the reference) and, where there is one, the GPU (the kernels).
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def seeded_randn(shape, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """``randn(shape)`` drawn on the CPU from ``seed`` (the same values on every device), as ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)
