"""The ops' forms launched by Inductor (:mod:`bitfx.ops.inductor`), and the backend's choice
between them and the custom ops (``BitfxConfig.launch``).

CPU (Triton's interpreter): each form computes what the kernels compute when launched by the
custom ops, bit for bit (the training op's form with the op's backward); :func:`retarget` swaps
exactly the ops that have a form, and leaves a call whose rows are an unbacked size to the
custom op; the backend swaps on CUDA only, with ``"auto"`` outside CUDA graphs only. CUDA: the
forms traced into Inductor's code (no custom-op call left in it, no input of a kernel copied),
equal to the custom ops' kernels for static and dynamic row counts, and whole models (a decode,
a training step) compiled both ways giving the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from bitfx import BitfxConfig
from bitfx.backend import _inductor_launches, _static_launch
from bitfx.kernels import norm_quant as nq, ternary_matmul as tm
from bitfx.ops import inductor
from tests.helpers import assert_close_up_to_code_flips, seeded_randn

ops = torch.ops.bitfx
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(N, K, seed=0, device=DEVICE):
    w = seeded_randn((N, K), torch.float32, device, seed)
    return ops.weight_quant(w, False)


@pytest.mark.parametrize("M,K,dtype", [(1, 64, torch.float32), (5, 48, torch.bfloat16), (3, 40, torch.float16)])
@pytest.mark.parametrize("offset,cbw,has_weight", [(False, True, True), (True, False, True), (False, False, False)])
def test_norm_and_act_quant_forms_equal_the_kernels(M, K, dtype, offset, cbw, has_weight):
    x = seeded_randn((2, M, K), dtype, DEVICE, 1) * 3
    g = seeded_randn((K,), dtype, DEVICE, 2) if has_weight else None
    q, s = ops.norm_quant_triton(x, g, 1e-5, offset, cbw, torch.float32)
    q0, s0, _ = nq.norm_quant(x.reshape(-1, K), g, 1e-5, offset, cbw, torch.float32)
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q.reshape(-1, K), q0) and torch.equal(s.reshape(-1), s0)
    q, s = ops.act_quant_triton(x, 6)
    q0, s0 = nq.act_quant(x.reshape(-1, K), 31)
    assert torch.equal(q.reshape(-1, K), q0) and torch.equal(s.reshape(-1), s0)


@pytest.mark.parametrize("M", [1, 3, 70])
@pytest.mark.parametrize("K,N", [(64, 48), (44, 20), (42, 20)])
@pytest.mark.parametrize("has_bias", [False, True])
def test_ternary_matmul_form_equals_the_kernel(M, K, N, has_bias):
    packed, w_scale = _weight(N, K)
    q = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(M)).to(DEVICE)
    x_scale = torch.rand(M, generator=torch.Generator().manual_seed(1)).to(DEVICE) + 0.5
    bias = seeded_randn((N,), torch.bfloat16, DEVICE, 3) if has_bias else None
    got = ops.ternary_matmul_triton(q.view(1, M, K), x_scale.view(1, M), packed, w_scale, bias, torch.bfloat16, K)
    want = tm.ternary_matmul(q, x_scale, packed, w_scale, bias, torch.bfloat16)
    assert got.shape == (1, M, N)
    assert torch.equal(got.view(M, N), want)


@pytest.mark.parametrize("normalize", [True, False])
def test_bitlinear_stacked_form_is_the_kernels_with_the_ops_backward(normalize):
    """The training op's form: its forward is the norm (or quantization) kernel and the matmul
    kernel, bit for bit; its backward is the op's straight-through backward."""
    K = 64
    x = seeded_randn((2, 3, K), torch.float32, DEVICE, 0).requires_grad_()
    g = seeded_randn((K,), torch.float32, DEVICE, 1).requires_grad_() if normalize else None
    w1, w2 = (seeded_randn((n, K), torch.float32, DEVICE, n).requires_grad_() for n in (32, 16))
    packed, w_scale = ops.weight_quant_stacked([w1.detach(), w2.detach()], [False, True])
    args = (x, g, [w1, w2], packed, w_scale, None, 1e-6, False, True, torch.float32, normalize)
    out, q, s, rstd = ops.bitlinear_stacked_triton(*args)
    x2 = x.detach().reshape(-1, K)
    q0, s0, r0 = nq._launch_quant(x2, None if g is None else g.detach(), 1e-6, False, True, torch.float32,
                                  norm=normalize)
    assert torch.equal(q.reshape(-1, K), q0) and torch.equal(s.reshape(-1), s0)
    assert torch.equal(rstd.reshape(-1), r0) if normalize else not rstd.any()
    assert torch.equal(out.reshape(-1, 48), tm.ternary_matmul(q0, s0, packed, w_scale, None, torch.float32))
    want = ops.bitlinear_stacked(*args)[0]
    dout = seeded_randn(out.shape, torch.float32, DEVICE, 7)
    leaves = [x, w1, w2] + ([g] if normalize else [])
    for got, ref_grad in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(want, leaves, dout)):
        # the same formulas on the same codes; on the CPU the op's scales come from the
        # reference (an ulp apart from the kernel's at most)
        torch.testing.assert_close(got, ref_grad, rtol=1e-4, atol=1e-4)


def test_forms_check_their_arguments():
    packed, w_scale = _weight(8, 32)
    q = torch.zeros(2, 32, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="in_features=16"):
        ops.ternary_matmul_triton(q, torch.ones(2, device=DEVICE), packed, w_scale, None, torch.float32, 16)
    with pytest.raises(TypeError, match="int8"):
        ops.ternary_matmul_triton(q.float(), torch.ones(2, device=DEVICE), packed, w_scale, None, torch.float32, 32)
    with pytest.raises(ValueError, match="norm weight has shape"):
        ops.norm_quant_triton(torch.ones(2, 32, device=DEVICE), torch.ones(31, device=DEVICE), 1e-6, False, True,
                              torch.float32)


def _site_graph():
    """A traced graph with the three inference ops and a dense op, with example values."""
    packed, w_scale = _weight(16, 32)
    g = torch.ones(32, device=DEVICE)

    def f(x, y):
        q, s = ops.norm_quant(x, g, 1e-6, False, True, torch.float32)
        a = ops.ternary_matmul(q, s, packed, w_scale, None, torch.float32, 32)
        q2, s2 = ops.act_quant(y)
        return a + 1, ops.ternary_matmul(q2, s2, packed, w_scale, None, torch.float32, 32)

    from torch.fx.experimental.proxy_tensor import make_fx

    x, y = seeded_randn((3, 32), torch.float32, DEVICE, 0), seeded_randn((3, 32), torch.float32, DEVICE, 1)
    return make_fx(f)(x, y), (x, y)


def test_retarget_swaps_the_inference_ops_only():
    gm, args = _site_graph()
    want = gm(*args)
    assert inductor.retarget(gm) == 4
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.norm_quant_triton.default) == 1
    assert targets.count(ops.act_quant_triton.default) == 1
    assert targets.count(ops.ternary_matmul_triton.default) == 2
    assert not any(t in inductor.TRITON_FORMS for t in targets)
    assert torch.ops.aten.add.Tensor in targets  # the dense op is left alone
    got = gm(*args)  # the forms run eagerly too (Triton's interpreter on the CPU)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # CPU: the custom ops are the plain-torch reference


def test_retarget_swaps_the_training_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    w = seeded_randn((16, 32), torch.float32, DEVICE, 0)
    packed, w_scale = ops.weight_quant_stacked([w], [False])

    def f(x):
        return ops.bitlinear_stacked(x, None, [w], packed, w_scale, None, 1e-6, False, True, torch.float32,
                                     False)[0]

    x = seeded_randn((3, 32), torch.float32, DEVICE, 1)
    gm = make_fx(f)(x)
    want = gm(x)
    assert inductor.retarget(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(
        ops.bitlinear_stacked_triton.default) == 1
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-4)


def test_retarget_leaves_unbacked_rows_to_the_custom_op():
    """Rows of an unbacked size: the launch rules cannot pick the kernel once for every call."""
    gm, _ = _site_graph()
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(shape_env=ShapeEnv())
    u = mode.shape_env.create_unbacked_symint()
    with mode:
        unbacked = torch.empty((u, 32))
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    first.meta["val"] = unbacked
    assert inductor.retarget(gm) == 3  # the norm on x stays; act_quant and both matmuls read backed shapes
    norm = next(n for n in gm.graph.nodes if n.op == "call_function" and "norm_quant" in str(n.target))
    assert norm.target is ops.norm_quant.default


def _fake_cuda(shape=(2,)):
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    return FakeTensor(FakeTensorMode(), torch.empty(shape, device="meta"), torch.device("cuda"))


def test_the_backend_launches_through_inductor_on_cuda_outside_cuda_graphs():
    cuda, cpu = [_fake_cuda()], [torch.ones(2)]
    assert BitfxConfig().launch == "auto"  # the default: Inductor launches outside CUDA graphs
    auto, by_inductor, by_op = BitfxConfig(), BitfxConfig(launch="inductor"), BitfxConfig(launch="op")
    assert _inductor_launches(auto, cuda, {})
    assert not _inductor_launches(auto, cuda, {"triton.cudagraphs": True})  # reduce-overhead, max-autotune
    assert _inductor_launches(by_inductor, cuda, {"triton.cudagraphs": True})
    assert not _inductor_launches(by_op, cuda, {})
    for config in (auto, by_inductor, by_op):
        assert not _inductor_launches(config, cpu, {})  # Inductor launches no Triton kernel on the CPU
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": True}):
        assert not _inductor_launches(auto, cuda, {})
    # a training graph: the custom ops unless told "inductor"
    assert not _inductor_launches(BitfxConfig(training=True), cuda, {})
    assert _inductor_launches(BitfxConfig(training=False), cuda, {})
    assert _inductor_launches(BitfxConfig(training=True, launch="inductor"), cuda, {})


def test_inductor_launches_bitfx_kernels_statically_unless_told_otherwise():
    """Where Inductor launches the kernels, its static launcher takes them (the setting Inductor
    leaves off for user-defined kernels), unless the caller's options say otherwise."""
    from torch._inductor import config as inductor_config

    name = "static_launch_user_defined_triton_kernels"
    if not hasattr(inductor_config, name):
        assert _static_launch({"a": 1}) == {"a": 1}  # an older torch: nothing to turn on
        return
    assert _static_launch({}) == {name: True}
    assert _static_launch({"max_autotune": True}) == {"max_autotune": True, name: True}
    assert _static_launch({name: False}) == {name: False}


def test_launch_option_is_checked():
    with pytest.raises(ValueError, match="launch must be one of"):
        BitfxConfig(launch="triton")
    with pytest.raises(ValueError, match="launch must be one of"):
        BitfxConfig(launch=True)


def _fakes(*dtypes):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [torch.empty(4, dtype=d) for d in dtypes]


def test_kernel_analysis_answered_once_per_distinct_launch(monkeypatch):
    """The memo of torch's kernel access analysis (:func:`inductor._memoized`): asked again for a
    bitfx kernel with other tensors of the same dtypes and the same scalars, it answers from the
    first analysis (a copy); another dtype, int value (Triton specializes on it) or constexpr,
    another kernel's, tensor descriptors, or any kernel not bitfx's is analysed afresh."""
    import triton
    import triton.language as tl

    @triton.jit
    def _foreign(x_ptr, n, BLOCK: tl.constexpr):
        pass

    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return {"writes": {"out"}}

    memo, kernel = inductor._memoized(analysis), tm._ternary_matmul_kernel
    a, b, c = _fakes(torch.int8, torch.float32, torch.bfloat16)
    a2, b2, c2 = _fakes(torch.int8, torch.float32, torch.bfloat16)
    saved = dict(inductor._MEMO)
    inductor._MEMO.clear()
    try:
        first = memo(kernel, {"q": a, "s": b, "n": 64, "BLOCK": 32}, {})
        again = memo(kernel, {"q": a2, "s": b2, "n": 64, "BLOCK": 32}, {})
        assert first == again == {"writes": {"out"}} and again is not first and len(calls) == 1
        first["writes"].add("q")  # a caller's change reaches neither the memo nor the next caller
        assert memo(kernel, {"q": a2, "s": b2, "n": 64, "BLOCK": 32}, {}) == {"writes": {"out"}}
        assert len(calls) == 1
        for kwargs in ({"q": a, "s": c, "n": 64, "BLOCK": 32}, {"q": a, "s": b, "n": 1, "BLOCK": 32},
                       {"q": a, "s": b, "n": 64, "BLOCK": 64}):
            memo(kernel, kwargs, {})
        assert len(calls) == 4
        memo(nq._norm_quant_kernel, {"q": a, "s": b, "n": 64, "BLOCK": 32}, {})
        assert len(calls) == 5
        for _ in range(2):
            memo(kernel, {"q": a, "s": b, "n": 64, "BLOCK": 32}, {"q": ("stable", [16])})
            memo(_foreign, {"x_ptr": a, "n": 64, "BLOCK": 32}, {})
            memo(kernel, {"q": a, "s": b, "n": object(), "BLOCK": 32}, {})
        assert len(calls) == 11
        # Launches with warps or stages reach the analysis as a new one-config autotuner per call.
        wrapped = [triton.autotune(configs=[triton.Config({}, num_warps=w)], key=[])(kernel) for w in (4, 4, 8)]
        for t in wrapped:
            memo(t, {"q": a, "s": b, "n": 32, "BLOCK": 32}, {})
        assert len(calls) == 12  # the kernel's IR, whatever the warps
        memo(kernel, {"q": a, "s": b, "n": 32, "BLOCK": 32}, {})
        assert len(calls) == 12  # the same IR as the plain launch's
        memo(triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=[])(kernel), {"q": a, "s": b, "n": 32}, {})
        assert len(calls) == 13  # another config's arguments: another IR
        monkeypatch.setattr(inductor, "_MEMO_KEPT", 2)
        for n in (100, 101, 102):
            memo(kernel, {"q": a, "s": b, "n": n, "BLOCK": 32}, {})
        assert len(inductor._MEMO) == 2 and len(calls) == 16
        memo(kernel, {"q": a, "s": b, "n": 102, "BLOCK": 32}, {})  # kept: the newest
        memo(kernel, {"q": a, "s": b, "n": 100, "BLOCK": 32}, {})  # dropped: the oldest
        assert len(calls) == 17
        # An analysis of two arguments (earlier torch's signature) is called as it was.
        two = inductor._memoized(lambda kernel, kwargs: calls.append(kernel) or ["out"])
        assert two(kernel, {"q": a, "s": b, "n": 7, "BLOCK": 32}) == ["out"]
        assert two(kernel, {"q": a2, "s": b2, "n": 7, "BLOCK": 32}) == ["out"] and len(calls) == 18
    finally:
        inductor._MEMO.clear()
        inductor._MEMO.update(saved)


def test_memo_traces_the_same_graph_with_fewer_analyses():
    """Six training sites through the training op's form, traced by AOTAutograd with torch's
    real kernel analysis (the Triton IR built for sm_90, no GPU needed), with and without the
    memo: the same forward graph, the memo analysing each distinct launch once (the two
    kernels) where torch analysed every call (``trace_forms_memo.py``, in a subprocess: the
    interpreter's kernels have no IR)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "trace_forms_memo.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert "graph True analyses" in out.stdout and out.stdout.split()[-1] == "2", out.stdout


def test_kernel_analysis_memo_restores_torchs_functions():
    from torch._higher_order_ops import triton_kernel_wrap

    names = [n for n in inductor._ANALYSES if n in vars(triton_kernel_wrap)]
    assert names, "torch's kernel access analysis not found: the memo would change nothing"
    before = {n: getattr(triton_kernel_wrap, n) for n in names}
    with inductor.kernel_analysis_memo():
        for n in names:
            assert getattr(triton_kernel_wrap, n).__wrapped__ is before[n]
        with inductor.kernel_analysis_memo():  # nested: wrapped once
            assert getattr(triton_kernel_wrap, names[0]).__wrapped__ is before[names[0]]
    assert {n: getattr(triton_kernel_wrap, n) for n in names} == before


# ------------------------------------------------------------------ CUDA: traced into Inductor's code


@pytest.mark.cuda
def test_opcheck_forms():
    """The forms' registrations (schema, fake implementation from the body, dispatch) on the GPU."""
    from torch.library import opcheck

    packed, w_scale = _weight(96, 128)
    x = seeded_randn((2, 3, 128), torch.bfloat16, "cuda", 0)
    g = seeded_randn((128,), torch.bfloat16, "cuda", 1)
    q, s = ops.norm_quant_triton(x, g, 1e-6, False, True, torch.bfloat16)
    opcheck(ops.norm_quant_triton, (x, g, 1e-6, False, True, torch.bfloat16))
    opcheck(ops.act_quant_triton, (x,))
    opcheck(ops.ternary_matmul_triton, (q, s, packed, w_scale, None, torch.bfloat16, 128))
    for rows in (x[:1, :1], x):  # one row (the fused kernel), and several
        opcheck(ops.ternary_linear_triton, (rows, g, 1e-6, False, True, torch.bfloat16, True, 8, packed, w_scale,
                                            None, torch.bfloat16, 128))


def _record_clones():
    """A post-grad pre-pass recording, for every user Triton kernel in the graph, which of its
    arguments the functional form says must be copied before the launch (its mutated inputs)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    seen = []

    def record(graph):
        for n in graph.nodes:
            if n.target is triton_kernel_wrapper_functional:
                name = kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                seen.append((name, tuple(n.kwargs["tensors_to_clone"])))

    return seen, record


# What each kernel writes: its outputs (and a split-K workspace), never an input.
_OUTPUTS = {"_norm_quant_kernel": {"Q", "SCALE", "RSTD", "H"},
            "_ternary_dp4a_kernel": {"out_ptr", "ws_ptr", "lock_ptr"},
            "_ternary_matmul_kernel": {"out_ptr", "ws_ptr", "lock_ptr"},
            "_front_gemv_kernel": {"out_ptr", "SX"}}


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_forms_compile_into_inductors_code(dynamic):
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    K, N = 256, 384
    packed, w_scale = _weight(N, K)
    g = seeded_randn((K,), torch.bfloat16, "cuda", 5)

    def f(x):
        q, s = ops.norm_quant_triton(x, g, 1e-6, False, True, torch.bfloat16)
        y = ops.ternary_matmul_triton(q, s, packed, w_scale, None, torch.bfloat16, K)
        q2, s2 = ops.act_quant_triton(torch.relu(y))
        return y, q2, s2

    def eager(x):
        q, s, _ = nq.norm_quant(x.reshape(-1, K), g, 1e-6, False, True, torch.bfloat16)
        y = tm.ternary_matmul(q, s, packed, w_scale, None, torch.bfloat16)
        q2, s2 = nq.act_quant(torch.relu(y))
        return y, q2, s2

    seen, record = _record_clones()
    compiled = torch.compile(f, dynamic=dynamic)
    with inductor_config.patch({"fx_graph_cache": False, "post_grad_custom_pre_pass": record}):
        for M in (1, 7, 300, 2) if dynamic else (1,):
            x = seeded_randn((M, K), torch.bfloat16, "cuda", M)
            got, codes = run_and_get_code(compiled, x) if M == 1 else (compiled(x), None)
            for a, b in zip(got, eager(x)):
                assert torch.equal(a.reshape(b.shape), b), M
            if codes is not None:
                code = "\n".join(codes)
                assert "bitfx." not in code  # no custom-op call: Inductor launches the kernels
                assert "_norm_quant_kernel" in code and "_ternary_dp4a_kernel" in code
    assert seen, "no user Triton kernel reached Inductor's graph"
    for name, cloned in seen:
        assert set(cloned) <= _OUTPUTS[name], (name, cloned)


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_add_norm_quant_form_compiles_into_inductors_code(dynamic):
    """The residual add's form in Inductor's code: the same sum, codes and scales as the eager
    kernel, bit for bit, and no input cloned (the kernel writes its outputs only)."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    K = 320
    g = seeded_randn((K,), torch.bfloat16, "cuda", 5)

    def f(a, b):
        return ops.add_norm_quant_triton(a * 2, b, g, 1e-6, False, True, torch.bfloat16)

    seen, record = _record_clones()
    compiled = torch.compile(f, dynamic=dynamic)
    with inductor_config.patch({"fx_graph_cache": False, "post_grad_custom_pre_pass": record}):
        for M in (1, 7, 300) if dynamic else (3,):
            a, b = seeded_randn((M, K), torch.bfloat16, "cuda", M), seeded_randn((M, K), torch.bfloat16, "cuda", M + 1)
            h, q, s, _ = nq.add_norm_quant(a * 2, b, g, 1e-6, False, True, torch.bfloat16)
            for got, want in zip(compiled(a, b), (h, q, s)):
                assert torch.equal(got, want), M
    assert seen and {name for name, _ in seen} == {"_norm_quant_kernel"}
    for name, cloned in seen:
        assert set(cloned) <= _OUTPUTS[name], (name, cloned)


@pytest.mark.cuda
@pytest.mark.parametrize("act", ["silu", "relu2"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_glu_quant_form_compiles_into_inductors_code(dynamic, act):
    """The gated activation's form in Inductor's code: the codes and scales of the eager kernel,
    bit for bit, and no input cloned."""
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    K = 704
    g = seeded_randn((K,), torch.bfloat16, "cuda", 5)

    def f(stacked):
        gate, up = stacked.split(K, dim=-1)
        return ops.glu_quant_triton(gate, up, act, g, 1e-6, False, True, torch.bfloat16, True)

    seen, record = _record_clones()
    compiled = torch.compile(f, dynamic=dynamic)
    with inductor_config.patch({"fx_graph_cache": False, "post_grad_custom_pre_pass": record}):
        for M in (1, 7, 300) if dynamic else (3,):
            stacked = seeded_randn((M, 2 * K), torch.bfloat16, "cuda", M)
            q, s, _ = nq.glu_quant(stacked[:, :K], stacked[:, K:], act, g, 1e-6, False, True, torch.bfloat16, True)
            for got, want in zip(compiled(stacked), (q, s)):
                assert torch.equal(got, want), M
    assert seen and {name for name, _ in seen} == {"_norm_quant_kernel"}
    for name, cloned in seen:
        assert set(cloned) <= _OUTPUTS[name], (name, cloned)


@pytest.mark.cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_ternary_linear_form_compiles_into_inductors_code(dynamic, monkeypatch):
    """The whole linear's form in Inductor's code: one row, the fused kernel (no custom-op
    call, no input copied); more rows, the two kernels; the eager kernels' numbers bit for bit."""
    monkeypatch.setenv("BITFX_FRONT_GEMV", "1")
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from bitfx.kernels import front_gemv as fg

    torch._dynamo.reset()
    K, N = 2560, 3840
    packed, w_scale = _weight(N, K)
    g = seeded_randn((K,), torch.bfloat16, "cuda", 5)

    def f(x):
        return ops.ternary_linear_triton(x, g, 1e-6, False, True, torch.bfloat16, True, 8, packed, w_scale, None,
                                         torch.bfloat16, K)

    def eager(x):
        if x.shape[0] == 1:
            return fg.front_gemv(x, g, 1e-6, False, True, torch.bfloat16, True, 127, packed, w_scale, None,
                                 torch.bfloat16)[0]
        q, s, _ = nq.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)
        return tm.ternary_matmul(q, s, packed, w_scale, None, torch.bfloat16)

    seen, record = _record_clones()
    compiled = torch.compile(f, dynamic=dynamic)
    with inductor_config.patch({"fx_graph_cache": False, "post_grad_custom_pre_pass": record}):
        for M in (1, 7, 300) if dynamic else (1,):
            x = seeded_randn((M, K), torch.bfloat16, "cuda", M)
            got, codes = run_and_get_code(compiled, x) if M == 1 else (compiled(x), None)
            assert torch.equal(got, eager(x)), M
            if codes is not None:
                code = "\n".join(codes)
                assert "bitfx." not in code and "_front_gemv_kernel" in code
    assert any(name == "_front_gemv_kernel" for name, _ in seen)
    for name, cloned in seen:
        assert set(cloned) <= _OUTPUTS[name], (name, cloned)


@pytest.mark.cuda
def test_training_step_the_same_whoever_launches(monkeypatch):
    """A Llama's training step compiled with ``launch="inductor"`` (the training op's forward
    kernels in Inductor's code) and with the custom ops: the same loss and gradients. Torch's
    analysis of the kernels' accesses ran once per distinct launch of a bitfx kernel
    (:func:`inductor.kernel_analysis_memo`), not once per call and stage."""
    import copy

    from torch._higher_order_ops import triton_kernel_wrap

    from tests import models
    from tests.test_backend import op_counts, recording_backend

    name = next(n for n in inductor._ANALYSES if n in vars(triton_kernel_wrap))
    analysed, original = [], getattr(triton_kernel_wrap, name)

    def recording(kernel, kwargs, tma, *args, **kw):
        if inductor._is_bitfx_kernel(kernel):
            analysed.append(inductor._analysis_key(kernel, kwargs, tma))
        return original(kernel, kwargs, tma, *args, **kw)

    monkeypatch.setattr(triton_kernel_wrap, name, recording)
    monkeypatch.setattr(inductor, "_MEMO", {})
    base, ids = models.tiny_llama()
    base, ids = base.cuda().train(), ids.cuda()
    results = {}
    for launch in ("inductor", "op"):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        backend, graphs = recording_backend()
        loss = torch.compile(model, backend=backend, options={"launch": launch})(ids, labels=ids).loss
        loss.backward()
        targets = {str(n.target) for n in graphs[0].graph.nodes}
        assert ("bitfx.bitlinear_stacked_triton.default" in targets) == (launch == "inductor")
        assert op_counts(graphs[0])["bitlinear_stacked"] > 0
        results[launch] = (loss.detach(), [p.grad for p in model.parameters()])
    assert analysed and None not in analysed and len(set(analysed)) == len(analysed), analysed
    (loss_a, grads_a), (loss_b, grads_b) = results["inductor"], results["op"]
    assert torch.equal(loss_a, loss_b)  # the forward: the same kernels, the same numbers
    for a, b in zip(grads_a, grads_b):
        # The backward: the same formulas, but not bit for bit between two compiles on a GPU: the
        # embedding's gradient adds rows with atomics in no fixed order, and Inductor may cut the
        # kernels around a user Triton kernel otherwise than around a custom-op call (another
        # fp32 summation order). Equal to fp32 rounding, relative to each gradient's size.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_the_same_whoever_launches(dtype):
    """A Llama compiled in default mode (Inductor launches the kernels) and with
    ``launch="op"`` (custom ops): the same kernels, the same logits up to code flips; under
    ``mode="reduce-overhead"`` the graph keeps the custom ops.

    Not bit for bit (the first H200 run of this test found it): Inductor cuts and fuses the float
    code around a user Triton kernel otherwise than around a custom-op call, so the norms'
    inputs and the residual adds may differ in their last bits, and an int8 code on a rounding
    boundary moves by one. The kernels themselves are compared bit for bit by
    ``test_ternary_linear_form_equals_the_op`` and the other form tests."""
    from tests import models
    from tests.test_backend import recording_backend

    model, ids = models.tiny_llama(dtype=dtype)
    model, ids = model.cuda(), ids.cuda()
    logits, kinds = {}, {}
    for launch, mode in (("auto", None), ("op", None), ("auto", "reduce-overhead")):
        torch._dynamo.reset()
        backend, graphs = recording_backend()
        # (torch.compile takes a mode or options, not both: reduce-overhead is its cudagraphs setting)
        options = {"launch": launch, **({"triton.cudagraphs": True} if mode == "reduce-overhead" else {})}
        compiled = torch.compile(model, backend=backend, options=options)
        with torch.no_grad():
            for _ in range(3):  # CUDA graphs: warm-up, record, replay
                out = compiled(ids).logits.clone()
        logits[launch, mode] = out
        kinds[launch, mode] = {str(n.target) for n in graphs[0].graph.nodes if "bitfx." in str(n.target)}
    # (each front and its matmuls are one ternary_linear on CUDA: bitfx.passes.fronts; under CUDA
    # graphs a front whose norm reads a residual add is add_norm_quant, then its matmuls:
    # bitfx.passes.residual; the down projection's front reading SiLU(gate) * up is glu_quant:
    # bitfx.passes.glu)
    assert kinds["auto", None] == {"bitfx.ternary_linear_triton.default"}
    assert kinds["op", None] == {"bitfx.ternary_linear.default"}
    assert kinds["auto", "reduce-overhead"] == {"bitfx.ternary_linear.default", "bitfx.add_norm_quant.default",
                                                "bitfx.glu_quant.default", "bitfx.ternary_matmul.default"}
    rtol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 logits: one bf16 step where they differ
    assert_close_up_to_code_flips(logits["auto", None].float(), logits["op", None].float(), rtol=rtol)
    # reduce-overhead keeps the custom ops: the graph of launch="op", replayed
    assert_close_up_to_code_flips(logits["auto", "reduce-overhead"].float(), logits["op", None].float(), rtol=rtol)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_ternary_linear_form_equals_the_op(M, normalize, monkeypatch):
    """One row: the fused kernel; more: the two kernels; either way the kernels' numbers bit for
    bit (these integer-valued rows have exact sums of squares), and on CUDA the custom op's."""
    monkeypatch.setenv("BITFX_FRONT_GEMV", "1")
    K, N = 40, 24
    packed, w_scale = _weight(N, K)
    gen = torch.Generator().manual_seed(M)
    x = torch.randint(-9, 10, (1, M, K), generator=gen).to(torch.bfloat16).to(DEVICE)
    g = (torch.rand(K, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE) if normalize else None
    bias = seeded_randn((N,), torch.bfloat16, DEVICE, 3)
    args = (x, g, 1e-6, False, True, torch.bfloat16, normalize, 8, packed, w_scale, bias, torch.bfloat16, K)
    got = ops.ternary_linear_triton(*args)
    if normalize:
        q, s, _ = nq.norm_quant(x.reshape(M, K), g, 1e-6, False, True, torch.bfloat16)
    else:
        q, s = nq.act_quant(x.reshape(M, K))
    want = tm.ternary_matmul(q, s, packed, w_scale, bias, torch.bfloat16, path="dp4a" if M == 1 else None)
    assert got.shape == (1, M, N) and torch.equal(got.reshape(M, N), want)
    if DEVICE == "cuda":  # (on the CPU the op is the reference, whose epilogue divides)
        assert torch.equal(got, ops.ternary_linear(*args))
