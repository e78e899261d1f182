"""``decode_attention``: the attention of one query per head against a key/value cache, with
grouped heads read where they lie (schema in :data:`bitfx.ops.library.SCHEMAS`). With
``BITFX_FUSE_ATTENTION=1`` the backend's decode graphs under CUDA graphs call it in place of
``scaled_dot_product_attention`` and the repeat of the cache's heads before it
(:mod:`bitfx.passes.attention`). Inference only: no autograd formula (the pass
leaves graphs that need a gradient alone)."""

from __future__ import annotations

from bitfx import reference as ref
from bitfx.ops.library import check_decode_attention, kernels, register


@register("decode_attention", "reference")
def _(q, k, v, mask, scale):
    check_decode_attention("decode_attention", q, k, v, mask)
    return ref.decode_attention(q, k, v, mask, scale)


@register("decode_attention", "cuda")
def _(q, k, v, mask, scale):
    check_decode_attention("decode_attention", q, k, v, mask)  # shapes, dtypes, devices: no device read
    return kernels("attention").decode_attention(q, k, v, mask, scale)


@register("decode_attention", "fake")
def _(q, k, v, mask, scale):
    check_decode_attention("decode_attention", q, k, v, mask)
    return q.new_empty(q.shape)
