"""``front_norm`` (the norm alone, what an eager model's fused norm module launches) and
``front_norm_parts`` (the norm with the linears that read its output, in one launch): ``y``
against the eager reference within the norm's stated tolerance; the ``y`` of the two launches the
same bit for bit, whatever the rows, dtypes and cast order; each linear's output bit for bit what
``front_gemv_parts`` gives for that ``y`` (its codes are made from the very values stored)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bitfx import reference as ref
from bitfx.kernels import front_gemv as fg
from tests.helpers import KERNEL_DEVICE
from tests.kernels.test_front_gemv import _operands
from tests.kernels.test_norm_quant import _case, _rel_y, make_rows, make_weight, norm_cases

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEV = KERNEL_DEVICE
CUDA = DEV.type == "cuda"


def _inputs(case):
    x = make_rows(case["M"], case["K"], case["dtype"], case["seed"], case["layout"], case["special_rows"])
    w = make_weight(case["K"], case["w_dtype"], case["seed"], case["offset"]) if case["has_weight"] else None
    return x, w


@given(norm_cases(max_m=16))
@example(_case(M=0, K=5))
@example(_case(M=1, K=1))
@example(_case(M=3, K=1, dtype=torch.bfloat16, has_weight=False, layout="transposed"))
@example(_case(M=4, K=131, dtype=torch.float16, offset=True, cbw=False, layout="every_other"))
@example(_case(M=8, K=97, dtype=torch.bfloat16, w_dtype=torch.float32, special_rows=True, eps=0.0,
               norm_dtype=torch.float32, layout="row_stride"))
def test_front_norm_computes_the_norm(case):
    x, w = _inputs(case)
    y = fg.front_norm(x, w, case["eps"], case["offset"], case["cbw"], case["norm_dtype"])
    assert y.shape == x.shape and y.dtype == case["norm_dtype"] and y.device == x.device
    y_ref = ref.rms_norm(x.cpu(), None if w is None else w.cpu(), case["eps"], offset=case["offset"],
                         cast_before_weight=case["cbw"], norm_dtype=case["norm_dtype"])
    # The norm's tolerance (its fp32 reduction order and rounding to the output dtype; see
    # test_norm_quant._rel_y), relative per element; NaN rows stay NaN.
    torch.testing.assert_close(y.cpu().float(), y_ref.float(), rtol=_rel_y(case), atol=0.0, equal_nan=True)


def _same(a, b) -> bool:
    """Equal bit for bit, NaN where the other is NaN (a zero row with eps 0 normalizes to NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _parts(K, ns, bias, dtype, seed):
    out = []
    for i, n in enumerate(ns):
        _, _, packed, s_w, b = _operands(1, n, K, dtype, seed=seed * 7 + i, bias=bias)
        out.append((packed, s_w, b))
    return out


@st.composite
def _lead_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    has_weight = draw(st.booleans())
    w_dtype = draw(st.sampled_from([dtype, torch.float32])) if has_weight else None
    cbw = draw(st.booleans())
    return dict(
        M=draw(st.integers(1, 5)), K=draw(st.sampled_from([4, 16, 37, 64, 130] + ([300, 2560, 4100] if CUDA else []))),
        ns=draw(st.lists(st.integers(1, 300 if CUDA else 20), min_size=1, max_size=fg.MAX_PARTS)),
        bias=draw(st.booleans()),
        dtype=dtype, has_weight=has_weight, w_dtype=w_dtype, offset=draw(st.booleans()), cbw=cbw,
        norm_dtype=draw(st.sampled_from([ref.norm_dtype_for(dtype, w_dtype, cbw), dtype])),
        eps=draw(st.sampled_from([1e-6, 0.0])), layout=draw(st.sampled_from(["contiguous", "row_stride"])),
        special_rows=draw(st.booleans()), qmax=draw(st.sampled_from([127, 7])), seed=draw(st.integers(0, 2**20)),
    )  # fmt: skip


@settings(max_examples=60 if CUDA else 6, deadline=None)  # (the interpreter: seconds an example)
@given(_lead_cases())
def test_norm_with_its_linears_is_the_norm_then_each_linear(case):
    """One launch of the norm and its linears against the two launches it replaces: ``y`` equal
    to ``front_norm``'s bit for bit (and so an eager model gives the same numbers whether its
    linears ran in the norm's launch or after it), each output equal to ``front_gemv_parts`` of
    that ``y``; bound, the same for another row count."""
    x, w = _inputs(case)
    K, dtype = case["K"], case["norm_dtype"]
    parts = _parts(K, case["ns"], case["bias"], dtype, case["seed"])
    norm = (w, case["eps"], case["offset"], case["cbw"], dtype)
    y, outs, again = fg.front_norm_parts(x, *norm, case["qmax"], parts, bind=True)
    alone = fg.front_norm(x, *norm)
    assert y.dtype == dtype and y.shape == x.shape and _same(y, alone)
    want, _ = fg.front_gemv_parts(y, case["qmax"], parts, dtype)
    assert len(outs) == len(parts)
    for got, ref_out, n in zip(outs, want, case["ns"]):
        assert got.shape == (x.shape[0], n) and got.dtype == dtype
        assert _same(got, ref_out)
    x2 = make_rows(case["M"] + 2, K, case["dtype"], case["seed"] + 1, case["layout"])
    y2, flat = again(x2)
    assert _same(y2, fg.front_norm(x2, *norm))
    for got, ref_out in zip(flat, fg.front_gemv_parts(y2, case["qmax"], parts, dtype)[0]):
        assert _same(got.view(ref_out.shape), ref_out)


def test_front_norm_bound_launch_takes_other_row_counts():
    x, w = _inputs(_case(M=5, K=48))
    y, again = fg.front_norm(x, w, 1e-6, False, True, torch.float32, bind=True)
    x2 = make_rows(9, 48, torch.float32, seed=7)
    assert torch.equal(again(x2), fg.front_norm(x2, w, 1e-6, False, True, torch.float32))
    assert torch.equal(again(x), y)
    empty, none = fg.front_norm(x[:0], w, 1e-6, False, True, torch.float32, bind=True)
    assert empty.shape == (0, 48) and none is None


def test_front_norm_rejects_bad_input():
    x = torch.randn(2, 8, device=DEV)
    parts = _parts(8, [4], False, torch.float32, 0)
    with pytest.raises(ValueError, match="8 features|K=8"):
        fg.front_norm(x, torch.ones(7, device=DEV), 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match="norm_dtype"):
        fg.front_norm(x, None, 1e-6, False, True, torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        fg.front_norm(x[0], None, 1e-6, False, True, torch.float32)
    with pytest.raises(ValueError, match="1 to 4"):
        fg.front_norm_parts(x, None, 1e-6, False, True, torch.float32, 127, parts * 5)
    with pytest.raises(ValueError, match="1 to 4"):
        fg.front_norm_parts(x, None, 1e-6, False, True, torch.float32, 127, [])
