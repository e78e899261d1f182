"""The fronts Inductor computes (``BitfxConfig(front="inductor")``): ``norm_quant_fusable`` and
``act_quant_fusable`` are ``norm_quant`` and ``act_quant`` in plain torch ops.

Exact where it can be: eager, they equal the reference ops bit for bit on any input (the
quantizer and every rounding step are the same operations). Compiled by Inductor, the quantizer
is still exact (its reciprocal goes through fp64, correctly rounded in any code) and so are the
norm's steps, but Inductor adds the sum of squares in its own order: the codes and scales are
compared bit for bit on integer-valued activations (whose sums are exact in any order), and up
to a code flip on random ones. In a whole model, the backend with ``front="inductor"`` runs no
front op per call and gives the default front's logits up to code flips.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import bitfx
from bitfx import reference as ref
from bitfx.config import BitfxConfig
from bitfx.passes.fronts import fusable_fronts
from tests import models
from tests.helpers import KERNEL_DEVICE, assert_close_up_to_code_flips

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

ops = torch.ops.bitfx
DEV = KERNEL_DEVICE
# (dtype, offset, cast_before_weight, with a weight, bits)
CASES = [(torch.float32, False, True, True, 8), (torch.bfloat16, False, True, True, 8),
         (torch.float16, True, False, True, 8), (torch.bfloat16, True, False, True, 4),
         (torch.bfloat16, False, True, False, 8), (torch.float16, False, True, True, 6)]


def _inputs(M, K, dtype, integer, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-9, 10, (M, K), generator=g).float() if integer else torch.randn(M, K, generator=g) * 3
    w = torch.randn(K, generator=g) * 0.5 + 1
    return x.to(DEV, dtype), w.to(DEV, dtype)


def _both(x, w, case, eps=1e-6):
    dtype, offset, cbw, has_w, bits = case
    w = w if has_w else None
    nd = ref.norm_dtype_for(dtype, None if w is None else w.dtype, cbw)
    return (x, w, eps, offset, cbw, nd, bits)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("K", [1, 7, 64, 2560])
def test_eager_forms_are_the_reference_bit_for_bit(case, K):
    x, w = _inputs(5, K, case[0], integer=False, seed=K)
    x[1, K // 2] = float("nan")  # a bad row: NaN scale, zero codes, as the reference
    x[3, 0] = float("inf")
    args = _both(x.cpu(), w.cpu(), case)
    for name in ("norm_quant", "act_quant"):
        call = (lambda op: op(*args)) if name == "norm_quant" else (lambda op: op(args[0], args[-1]))
        want = call(getattr(ops, name))
        got = call(getattr(ops, name + "_fusable"))
        assert torch.equal(got[0], want[0]), name
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0, equal_nan=True, msg=name)


def _compiled(fn, *args):
    from torch._inductor import config as inductor_config

    with inductor_config.patch(emulate_precision_casts=True):  # as the backend sets it for these graphs
        return torch.compile(fn, fullgraph=True)(*args)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("K", [7, 2560])
def test_compiled_forms_equal_the_op_on_exact_sums(case, K):
    """Inductor's code for the forms (C++ on the CPU, Triton on CUDA) against the op (the
    reference, or bitfx's kernel on CUDA): bit for bit where the sum of squares is exact."""
    x, w = _inputs(6, K, case[0], integer=True, seed=K)
    args = _both(x, w, case)
    want = ops.norm_quant(*args)
    got = _compiled(lambda x, w: ops.norm_quant_fusable(x, w, *args[2:]), x, args[1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    y = (x.float() * 0.37).to(x.dtype)
    want = ops.act_quant(y, args[-1])
    got = _compiled(lambda y: ops.act_quant_fusable(y, args[-1]), y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("case", CASES[:3])
def test_compiled_forms_on_random_rows_move_a_code_at_most(case):
    x, w = _inputs(16, 2560, case[0], integer=False, seed=1)
    args = _both(x, w, case)
    want_q, want_s = ops.norm_quant(*args)
    got_q, got_s = _compiled(lambda x, w: ops.norm_quant_fusable(x, w, *args[2:]), x, args[1])
    # another summation order moves rstd by an ulp or two; through the model's cast that may move
    # y, hence the absmax and the scale, by one step of its dtype, and a code by one
    step = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[case[0]]
    torch.testing.assert_close(got_s, want_s, rtol=2 * step, atol=0)
    assert (got_q.int() - want_q.int()).abs().max().item() <= 1
    assert (got_q != want_q).float().mean().item() < 0.05


def test_the_pass_swaps_the_front_ops_only():
    """After the rewrite, each front call (and nothing else) becomes its fusable form."""
    from bitfx.passes.naming import Naming
    from bitfx.passes.rewrite import bitfx_pass

    llama, ids = models.tiny_llama()
    seen = {}

    def backend(gm, example_inputs):
        bitfx_pass(gm, BitfxConfig(training=False), None, Naming([], list(example_inputs)))
        seen["before"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        seen["swapped"] = fusable_fronts(gm)
        seen["after"] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        return gm

    with torch.no_grad():
        torch.compile(llama, backend=backend)(ids)
    kernel_forms = (ops.norm_quant.default, ops.act_quant.default)
    fusable_forms = (ops.norm_quant_fusable.default, ops.act_quant_fusable.default)
    before, after = seen["before"], seen["after"]
    fronts = sum(t in kernel_forms for t in before)
    assert seen["swapped"] == fronts == 4 * models.LAYERS  # q/k/v and gate/up after norms; o and down alone
    assert not any(t in kernel_forms for t in after)
    assert sum(t in fusable_forms for t in after) == fronts
    assert [t for t in before if t not in kernel_forms] == [t for t in after if t not in fusable_forms]


def _op_calls(fn, *names) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_with_inductor_fronts_matches_the_kernel_fronts(dtype):
    model, ids = models.tiny_llama(dtype=dtype)
    model = model.to(DEV)
    ids = ids.to(DEV)
    with torch.no_grad():
        # the same Inductor setting both ways (the backend turns it on for front="inductor"), so
        # that only the fronts differ: their sums of squares, added in another order
        same = {"emulate_precision_casts": True}
        want = torch.compile(copy.deepcopy(model), backend="bitfx", options=same)(ids).logits.float()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bitfx", options={"front": "inductor"})
        got = compiled(ids).logits.float()
        fronts = ("bitfx::norm_quant", "bitfx::act_quant", "bitfx::ternary_linear")
        assert _op_calls(lambda: compiled(ids), *fronts) == 0  # Inductor's own code computes them
        assert _op_calls(lambda: compiled(ids), "bitfx::ternary_matmul") == 4 * models.LAYERS
    assert_close_up_to_code_flips(got, want, rtol=1e-5 if dtype == torch.float32 else 2 ** -7)


def test_front_option_is_checked():
    with pytest.raises(ValueError, match="front must be one of"):
        BitfxConfig(front="triton")
    assert BitfxConfig().front == "kernel"


@pytest.mark.cuda
def test_inductor_fronts_take_fewer_kernels_per_call():
    """On CUDA the front joins Inductor's kernels: a call of the tiny model launches fewer
    kernels than with bitfx's front kernel."""
    model, ids = models.tiny_llama(dtype=torch.bfloat16)
    model, ids = model.cuda(), ids.cuda()

    def kernels(fn):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())

    with torch.no_grad():
        by_kernel = torch.compile(copy.deepcopy(model), backend="bitfx")
        n_kernel = kernels(lambda: by_kernel(ids))
        torch._dynamo.reset()
        by_inductor = torch.compile(model, backend="bitfx", options={"front": "inductor"})
        n_inductor = kernels(lambda: by_inductor(ids))
    assert n_inductor < n_kernel, (n_inductor, n_kernel)
