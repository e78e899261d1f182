"""Inductor's lowering of ``bitfx::concat_buffer``.

Inductor lowers ``aten.cat`` of computed parts (each a pointwise computation not yet in memory)
as one pointwise kernel over the whole output, each element evaluating its part's computation
under a mask. In a training backward the parts of a stacked output's gradient are such
computations (the rotary embedding's backward of q and k, the activation's backward of gate
and up), and the one kernel that evaluates them all over ``[B, S, ΣN]`` is tiled for none of
them: at a 350M Llama's q/k/v it took four times what bf16's separate kernels take.

``concat_buffer`` is lowered as Inductor's other form of a cat, ``ir.ConcatKernel``: one
output buffer, and each part's producer realized straight into its slice (a part that cannot
be, such as an extern kernel's output, is copied into it). Each part keeps the kernel and the
tiling it would have on its own; no copy is added for a computed part.

The lowering is registered the first time a compile needs it (:func:`register_concat_buffer`,
called by the post-grad pass that emits the op), so importing bitfx imports nothing of
Inductor.
"""

from __future__ import annotations

import torch

__all__ = ["register_concat_buffer"]

_registered = False


def register_concat_buffer() -> bool:
    """Register the lowering of ``bitfx::concat_buffer`` with Inductor (once). Returns whether
    it is registered: False on a torch whose Inductor lacks ``ConcatKernel`` or the lowering
    registry, where the op would run as a plain ``torch.cat`` call and the pass leaves
    ``aten.cat`` alone instead."""
    global _registered
    if _registered:
        return True
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering
    except ImportError:  # pragma: no cover - a torch without these
        return False
    if not hasattr(ir, "ConcatKernel"):  # pragma: no cover
        return False

    @register_lowering(torch.ops.bitfx.concat_buffer.default, type_promotion_kind=None)
    def _concat_buffer(parts, dim):
        return ir.TensorBox(ir.ConcatKernel.create(list(parts), dim))

    _registered = True
    return True
