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


def assert_close_up_to_code_flips(got, want, max_fraction=0.01, rtol=1e-5, flipped_rows=0):
    """Compiled vs eager: Inductor (and bitfx's fused norm) round the float code around the
    sites differently, so an int8 code may move by one where a value lies on a rounding
    boundary. All but ``max_fraction`` of the outputs agree to ``rtol`` (fp32 rounding by
    default; outputs rounded to bf16 at the end differ by one bf16 step, ``2**-7`` relative at
    most, when the fp32 values before that rounding differ at all); all to a few codes' worth
    of the output scale. ``flipped_rows``: a whole model's logits, where one code that moved in
    a token's path moves every logit of that token (of the last token: nothing attends to it),
    so up to that many rows (the ones with the most outputs off) are left out of the fraction;
    they are still held to the few codes' worth."""
    scale = want.abs().max().item()
    off = ~torch.isclose(got, want, rtol=rtol, atol=rtol * scale)
    if flipped_rows:
        per_row = off.reshape(-1, off.shape[-1])
        keep = torch.ones(per_row.shape[0], dtype=torch.bool)
        keep[per_row.sum(-1).argsort(descending=True)[:flipped_rows]] = False
        off = per_row[keep]
    # (every row left out, as a one-token step's logits: the bound below is the whole check)
    assert off.numel() == 0 or off.float().mean().item() <= max_fraction, f"{off.sum().item()} of {off.numel()} outputs differ"
    torch.testing.assert_close(got, want, rtol=0, atol=0.03 * scale)


def ops_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """A ``BitfxLinear``'s output through ``torch.ops.bitfx`` (the dispatcher path: ``act_quant``
    then ``ternary_matmul``), against which its eager direct launches are compared."""
    bits = () if layer.act_bits == 8 else (layer.act_bits,)
    q, s = torch.ops.bitfx.act_quant(x, *bits)
    return torch.ops.bitfx.ternary_matmul(q, s, layer.packed, layer.w_scale, layer.bias, x.dtype, layer.in_features)


def replay_in_cuda_graph(step, outputs) -> None:
    """Run ``step`` once (its kernels compile outside the capture), capture it in a CUDA graph,
    zero ``outputs`` and replay the graph once: ``outputs`` then hold what the replay wrote."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for out in outputs:
        out.zero_()
    graph.replay()
    torch.cuda.synchronize()
