"""``rms_norm``, the norm alone (what an eager model's fused norm module runs): its ``y`` against
the eager reference within the norm's stated tolerance, and exactly the ``y`` that
``norm_quant`` quantizes: ``act_quant`` of it gives ``norm_quant``'s codes and scales bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given

from bitfx import reference as ref
from bitfx.kernels import norm_quant as nq
from tests.helpers import KERNEL_DEVICE
from tests.kernels.test_norm_quant import _case, _rel_y, make_rows, make_weight, norm_cases, row_block_limit

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(case):
    x = make_rows(case["M"], case["K"], case["dtype"], case["seed"], case["layout"], case["special_rows"])
    w = make_weight(case["K"], case["w_dtype"], case["seed"], case["offset"]) if case["has_weight"] else None
    return x, w


@given(norm_cases(max_m=16))
@example(_case(M=0, K=5))
@example(_case(M=1, K=1))
@example(_case(M=3, K=1, dtype=torch.bfloat16, has_weight=False, layout="transposed"))
@example(_case(M=4, K=131, dtype=torch.float16, offset=True, cbw=False, chunked=True, layout="every_other"))
@example(_case(M=8, K=97, dtype=torch.bfloat16, w_dtype=torch.float32, special_rows=True, eps=0.0,
               norm_dtype=torch.float32, layout="row_stride"))
def test_rms_norm_is_the_y_norm_quant_quantizes(case):
    x, w = _inputs(case)
    args = (case["eps"], case["offset"], case["cbw"], case["norm_dtype"])
    with row_block_limit(32 if case["chunked"] else None):
        y = nq.rms_norm(x, w, *args)
        q, s, _ = nq.norm_quant(x, w, *args)
    assert y.shape == x.shape and y.dtype == case["norm_dtype"] and y.device == x.device
    y_ref = ref.rms_norm(x.cpu(), None if w is None else w.cpu(), case["eps"], offset=case["offset"],
                         cast_before_weight=case["cbw"], norm_dtype=case["norm_dtype"])
    # The norm's tolerance (its fp32 reduction order and rounding to the output dtype; see
    # test_norm_quant._rel_y), relative per element.
    torch.testing.assert_close(y.cpu().float(), y_ref.float(), rtol=_rel_y(case), atol=0.0, equal_nan=True)
    # Exact: the codes and scales of this y are norm_quant's (the same helpers, the same order).
    q2, s2 = nq.act_quant(y)
    assert torch.equal(q2.cpu(), q.cpu())
    assert torch.allclose(s2.cpu(), s.cpu(), rtol=0.0, atol=0.0, equal_nan=True)  # NaN for bad rows on both


def test_rms_norm_bound_launch_takes_other_row_counts():
    case = _case(M=5, K=48, dtype=torch.float32)
    x, w = _inputs(case)
    y, again = nq.rms_norm(x, w, 1e-6, False, True, torch.float32, bind=True)
    x2 = make_rows(9, 48, torch.float32, seed=7)
    assert torch.equal(again(x2).cpu(), nq.rms_norm(x2, w, 1e-6, False, True, torch.float32).cpu())
    assert torch.equal(again(x).cpu(), y.cpu())


def test_rms_norm_rejects_bad_input():
    x = torch.randn(2, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="8 features|K=8"):
        nq.rms_norm(x, torch.ones(7, device=KERNEL_DEVICE), 1e-6, False, True, torch.float32)
    with pytest.raises(TypeError, match="norm_dtype"):
        nq.rms_norm(x, None, 1e-6, False, True, torch.float64)
    with pytest.raises(ValueError, match="2-D"):
        nq.rms_norm(x[0], None, 1e-6, False, True, torch.float32)
