"""The eager BitNet quantizer idioms (seed 000's ``BitLinear``, flash-linear-attention,
transformers' BitNet), read from an FX graph, so that already-BitNet code is replaced by the
fused ops with unchanged numbers.

* Activations, per token: ``s = 127 / |y|.max(-1, keepdim=True).values.clamp(min=1e-5)``,
  ``aq(y) = (y*s).round().clamp(-128, 127) / s`` (``amax`` too; optionally on ``y.float()``).
* Weights, absmean ternary: ``s = 1 / |w|.mean().clamp(min=1e-5)``,
  ``wq(w) = (w*s).round().clamp(-1, 1) / s`` (``mean(-1, keepdim=True)``: per output channel).
* Either used plainly, ``aq(y)``, or straight-through, ``y + (aq(y) - y).detach()``.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from bitfx.passes.fx_utils import (
    arg_of, as_dims, const_of, is_cast, is_last_dim, kind_of, other_operand, plain_binary, shape_of,
    strip_upcasts,
)
from bitfx.layout import SCALE_FLOOR

__all__ = ["match_act_quant", "match_weight_quant", "unwrap_quant"]


def _clamp_bounds(n: fx.Node) -> tuple[float | None, float | None]:
    if kind_of(n) == "clamp_min":
        return const_of(arg_of(n, 1, "min")), None
    lo, hi = arg_of(n, 1, "min"), arg_of(n, 2, "max")
    return (None if lo is None else const_of(lo)), (None if hi is None else const_of(hi))


def _is_floor_clamp(n: Any) -> bool:
    """``.clamp(min=1e-5)`` (or ``clamp_min``), the quantizers' floor."""
    if kind_of(n) not in ("clamp", "clamp_min"):
        return False
    lo, hi = _clamp_bounds(n)
    return lo == SCALE_FLOOR and hi is None and arg_of(n, 2, "max") is None


def _match_quant_body(c: Any, lo: float, hi: float) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(src, scale, nodes)`` for ``c = (src * scale).round().clamp(lo, hi) / scale``, optionally
    cast (``nodes`` then starts with the cast)."""
    cast = []
    if is_cast(c):
        cast = [c]
        c = c.args[0]
    if kind_of(c) != "div" or not plain_binary(c):
        return None
    cl, s = c.args[0], c.args[1]
    if kind_of(cl) != "clamp" or _clamp_bounds(cl) != (lo, hi):
        return None
    rd = cl.args[0]
    if kind_of(rd) != "round" or len(rd.args) > 1 or rd.kwargs.get("decimals"):
        return None
    m = rd.args[0]
    if kind_of(m) != "mul" or not plain_binary(m):
        return None
    src = other_operand(m, s)
    if not isinstance(src, fx.Node):
        return None
    return src, s, cast + [c, cl, rd, m]


def match_act_quant(c: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(y, nodes)`` if ``c`` is the eager per-token absmax int8 quantize-dequantize of ``y``:
    ``s = 127 / |y|.max(-1, keepdim=True).values.clamp(min=1e-5)``, ``(y*s).round().clamp(-128, 127) / s``,
    optionally on ``y.float()`` and cast back."""
    body = _match_quant_body(c, -128.0, 127.0)
    if body is None:
        return None
    src, s, nodes = body
    # s = 127 / floor(amax(|src|))
    if kind_of(s) != "div" or not plain_binary(s) or const_of(s.args[0]) != 127.0:
        return None
    fl = s.args[1]
    if not _is_floor_clamp(fl):
        return None
    amax = fl.args[0]
    if kind_of(amax) == "getitem" and amax.args[1] == 0 and kind_of(amax.args[0]) == "max":
        mx = amax.args[0]
        extra = [amax, mx]
    elif kind_of(amax) == "amax":
        mx = amax
        extra = [amax]
    else:
        return None
    ab = mx.args[0]
    if kind_of(ab) != "abs" or ab.args[0] is not src:
        return None
    ndim = len(shape_of(src) or ())
    if not is_last_dim(arg_of(mx, 1, "dim"), ndim) or not arg_of(mx, 2, "keepdim", False):
        return None
    nodes += [s, fl] + extra + [ab]
    y = strip_upcasts(src)
    if y is not src:
        nodes.append(src)
    return y, nodes


def match_weight_quant(c: Any) -> tuple[fx.Node, bool, list[fx.Node]] | None:
    """``(w, per_channel, nodes)`` if ``c`` is the eager absmean ternary quantize-dequantize of
    ``w``: ``s = 1 / |w|.mean().clamp(min=1e-5)``, ``(w*s).round().clamp(-1, 1) / s``
    (``mean(-1, keepdim=True)``: per output channel)."""
    body = _match_quant_body(c, -1.0, 1.0)
    if body is None:
        return None
    src, s, nodes = body
    if kind_of(s) == "div" and plain_binary(s) and const_of(s.args[0]) == 1.0:
        fl = s.args[1]
    elif kind_of(s) == "reciprocal":
        fl = s.args[0]
    else:
        return None
    if not _is_floor_clamp(fl):
        return None
    mean = fl.args[0]
    if kind_of(mean) != "mean":
        return None
    ab = mean.args[0]
    if kind_of(ab) != "abs" or ab.args[0] is not src:
        return None
    dim = arg_of(mean, 1, "dim")
    if dim is None or as_dims(dim) == []:
        per_channel = False
    elif is_last_dim(dim, 2) and arg_of(mean, 2, "keepdim", False):
        per_channel = True
    else:
        return None
    nodes += [s, fl, mean, ab]
    w = strip_upcasts(src)
    if w is not src:
        nodes.append(src)
    return w, per_channel, nodes


def _match_ste(n: Any) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(base, q, nodes)`` if ``n`` is ``base + (q - base).detach()``."""
    if kind_of(n) != "add" or not plain_binary(n):
        return None
    for base, d in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if kind_of(d) == "detach" and kind_of(d.args[0]) == "sub" and plain_binary(d.args[0]):
            sub = d.args[0]
            if sub.args[1] is base and isinstance(base, fx.Node):
                return base, sub.args[0], [n, d, sub]
    return None


def unwrap_quant(n: fx.Node, matcher) -> tuple[fx.Node, str | None, Any, list[fx.Node]]:
    """Strip an STE-wrapped or plain eager quantizer: ``(source, form, extra, nodes)``."""
    ste = _match_ste(n)
    if ste is not None:
        base, q, nodes = ste
        m = matcher(q)
        if m is not None and m[0] is strip_upcasts(base):
            return base, "ste", m[1:-1], nodes + m[-1]
    m = matcher(n)
    if m is not None:
        return m[0], "eager", m[1:-1], m[-1]
    return n, None, (), []
