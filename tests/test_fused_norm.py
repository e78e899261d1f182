"""Eager RMSNorm modules in one kernel after ``bitfx.quantize`` (:mod:`bitfx.fused_norm`): which
norms get it (a module whose whole forward is the norm of a site), that every call it cannot take
runs the module's own forward, that its kernel computes the module's norm (within the norm's
tolerance), that it learns the linears reading its output and then computes their outputs in
its own launch (each bit for bit the linear's own), and that it survives
``bitfx.save``/``bitfx.load``, ``deepcopy`` and pickling. The launch itself runs here through
``FusedNormForward._launch`` on the device at hand (the CPU: Triton's interpreter); the CUDA
tests at the end run whole eager models on the GPU."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bitfx
from bitfx import fused_norm
from bitfx.checkpoint import CheckpointError
from bitfx.demo.example import ExampleConfig, ExampleLlama
from bitfx import modules
from bitfx.kernels import front_gemv as fg
from bitfx.reference import act_qmax
from tests.helpers import KERNEL_DEVICE, ULP
from tests.kernels.test_eager_groups import launches  # noqa: F401  (a fixture)

CUDA = KERNEL_DEVICE.type == "cuda"
NORM_RTOL = 1e-5  # the norm's fp32 tolerance (tests/kernels/test_norm_quant.py says why)


def _example(dtype=torch.float32, layers=2):
    torch.manual_seed(0)
    return ExampleLlama(ExampleConfig(vocab=16, dim=32, hidden=64, heads=2, layers=layers)).to(dtype).eval()


def _quantized(model, ids):
    with torch.no_grad():
        return bitfx.quantize(model, ids)


IDS = torch.randint(0, 16, (1, 5), generator=torch.Generator().manual_seed(1))


def test_quantize_fuses_the_norm_modules_of_its_sites():
    model = _example()
    keys = list(model.state_dict())
    _quantized(model, IDS)
    fused = [f"layers.{i}.{n}" for i in range(2) for n in ("attn_norm", "mlp_norm")]
    assert model.bitfx_report.fused_norms == fused
    assert "as one kernel: 4" in str(model.bitfx_report)
    specs = fused_norm.fused_norms(model)
    assert list(specs) == fused  # the final norm feeds the dense output head: left as it is
    assert specs["layers.0.attn_norm"] == {"weight": "weight", "eps": 1e-6, "offset": False, "cast_before_weight": True,
                                           "K": 32, "x_dtype": "float32", "weight_dtype": "float32",
                                           "out_dtype": "float32"}
    norm = model.layers[0].attn_norm
    assert type(norm).__name__ == "RMSNorm" and isinstance(norm.forward, fused_norm.FusedNormForward)
    # Only the linears' names changed in the state_dict (packed codes and scales instead of weights).
    assert [k for k in model.state_dict() if "norm" in k] == [k for k in keys if "norm" in k]


class _ScaledNorm(nn.Module):
    """A norm module that does more than the norm: it scales its input first."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        x = 2.0 * x
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class _GemmaNorm(nn.Module):
    """Gemma's form: the weight applied as ``1 + w`` in fp32, then cast back."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x):
        xf = x.float()
        r = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return (r * (1.0 + self.weight.float())).type_as(x)


class _Sites(nn.Module):
    """Three sites: a module doing more than its norm, a Gemma norm module, a functional norm."""

    def __init__(self, dim=32):
        super().__init__()
        self.scaled, self.gemma = _ScaledNorm(dim), _GemmaNorm(dim)
        self.g = nn.Parameter(torch.rand(dim) + 0.5)
        self.a, self.b, self.c = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, x):
        x = x + self.a(self.scaled(x))
        x = x + self.b(self.gemma(x))
        return x + self.c(F.rms_norm(x, (x.shape[-1],), self.g, 1e-6))


def test_only_modules_whose_whole_forward_is_the_norm_are_fused():
    torch.manual_seed(0)
    model = _Sites()
    x = torch.randn(2, 3, 32)
    report = bitfx.explain(model, x)
    assert len(report.sites) == 3  # the scaled norm's site is found: its module is not only a norm
    _quantized(model, x)
    assert model.bitfx_report.fused_norms == ["gemma"]
    spec = fused_norm.fused_norms(model)["gemma"]
    assert spec["offset"] is True and spec["eps"] == 1e-5  # (an fp32 model: no cast order to read)
    assert "forward" not in model.scaled.__dict__


def _rel(dtype):
    return NORM_RTOL + (0.0 if dtype == torch.float32 else 2 * ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_the_kernel_computes_the_modules_norm(dtype, form):
    model = (_example(dtype) if form == "llama" else _Sites().to(dtype)).to(KERNEL_DEVICE)
    example = IDS if form == "llama" else torch.randn(2, 3, 32, dtype=dtype)
    _quantized(model, example.to(KERNEL_DEVICE))
    norm = model.layers[0].attn_norm if form == "llama" else model.gemma
    fwd = norm.forward
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(3)).to(dtype).to(KERNEL_DEVICE)
    want = type(norm).forward(norm, x)
    with torch.no_grad():
        got = fwd._launch(x, norm.weight)
        got3 = fwd._launch(x.view(1, 7, 32), norm.weight)
    assert got.dtype == want.dtype and got.shape == want.shape and got3.shape == (1, 7, 32)
    torch.testing.assert_close(got.float(), want.detach().float(), rtol=_rel(dtype), atol=0.0)
    s = fwd.spec
    # Exactly the kernel's norm (the y its linears quantize when they run in its launch).
    exact = fg.front_norm(x, norm.weight.detach(), s["eps"], s["offset"], s["cast_before_weight"], want.dtype)
    assert torch.equal(got, exact) and torch.equal(got3.view(7, 32), exact)
    with torch.no_grad():  # no rows, once the plan exists: an empty output, nothing launched
        empty = fwd._launch(x[:0], norm.weight)
    assert empty.shape == (0, 32) and empty.dtype == want.dtype


def test_calls_it_cannot_take_run_the_modules_forward():
    """On the CPU, with grad to carry, with a second argument, under torch.compile: the class's
    forward, whose numbers are the model's own (the same ops, the same order)."""
    model = _example()
    _quantized(model, IDS)
    norm = model.layers[0].attn_norm
    x = torch.randn(2, 4, 32, requires_grad=True)
    assert torch.equal(norm(x), type(norm).forward(norm, x))  # CPU
    y = norm(x)
    assert y.requires_grad and y.grad_fn is not None  # autograd through the model's own ops
    y.sum().backward()
    assert norm.weight.grad is not None
    # Compiled, the trace sees the model's norm: the backend still finds the site and fuses it.
    report = bitfx.explain(model, IDS, config=bitfx.BitfxConfig(training=False))
    assert [s.norm_module for s in report.sites if s.norm_module] == model.bitfx_report.fused_norms
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(model, backend=capture, fullgraph=True)(IDS)
        assert torch.equal(out, model(IDS))
    assert len(graphs) == 1 and any("rsqrt" in str(n.target) for n in graphs[0].graph.nodes)


def test_env_switch_and_bad_values(monkeypatch):
    model = _example().to(KERNEL_DEVICE)
    _quantized(model, IDS.to(KERNEL_DEVICE))
    fwd = model.layers[0].attn_norm.forward
    x = torch.randn(3, 32, device=KERNEL_DEVICE)
    monkeypatch.setenv("BITFX_EAGER_NORMS", "0")
    with torch.no_grad():
        assert fwd._launch(x, model.layers[0].attn_norm.weight) is None  # the caller runs the module's forward
    monkeypatch.setenv("BITFX_EAGER_NORMS", "yes")
    fwd.plans.clear()
    with pytest.raises(ValueError, match="BITFX_EAGER_NORMS must be 0 or 1"):
        fwd._launch(x, model.layers[0].attn_norm.weight)


def test_copies_and_pickles_keep_their_own_module():
    model = _example()
    _quantized(model, IDS)
    for other in (copy.deepcopy(model), _pickled(model)):
        norm = other.layers[1].mlp_norm
        assert isinstance(norm.forward, fused_norm.FusedNormForward) and norm.forward.module is norm
        assert norm.forward.spec == model.layers[1].mlp_norm.forward.spec and norm.forward.plans == {}
        with torch.no_grad():
            assert torch.equal(other(IDS), model(IDS))


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


CFG = ExampleConfig(vocab=16, dim=32, hidden=64, heads=2, layers=2)


def _saved(tmp_path):
    """A quantized example model and the checkpoint bitfx.save wrote of it."""
    model = _quantized(_example(), IDS)
    path = tmp_path / "m.safetensors"
    bitfx.save(model, path)
    return model, path


def _loaded(path):
    with torch.device("meta"):
        skeleton = ExampleLlama(CFG)
    return bitfx.load(skeleton, path)


def test_checkpoint_keeps_the_fused_norms(tmp_path):
    model, path = _saved(tmp_path)
    skeleton = _loaded(path)
    assert fused_norm.fused_norms(skeleton) == fused_norm.fused_norms(model)
    assert skeleton.layers[0].attn_norm.forward.module is skeleton.layers[0].attn_norm
    with torch.no_grad():
        assert torch.equal(skeleton(IDS), model(IDS))


def _rewrite_norms(src, dst, norms):
    """``src`` as ``dst`` with the metadata's "norms" entry set to ``norms`` (None: without one,
    as a file written before fused norms)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "norms"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if norms is not None:
        meta["norms"] = json.dumps(norms)
    save_file(tensors, str(dst), metadata=meta)


def test_checkpoint_with_bad_fused_norms_is_refused(tmp_path):
    model, path = _saved(tmp_path)
    good = fused_norm.fused_norms(model)["layers.0.attn_norm"]
    cases = [
        ({"layers.9.attn_norm": good}, "fused RMSNorm the model does not have"),
        ({"layers.0.attn_norm": dict(good, K=48)}, "a fused norm of K=48"),
        ({"layers.0.attn_norm": dict(good, weight="scale")}, "does not hold"),
        ({"layers.0.attn_norm": dict(good, x_dtype="int8")}, "x_dtype='int8'"),
        ({"layers.0.attn_norm": dict(good, eps=float("inf"))}, "eps=inf is not a finite number"),
        ({"layers.0.attn_norm": {"eps": 1e-6}}, "must hold exactly"),
        ([1, 2], "norms: not a JSON object"),
    ]
    for norms, message in cases:
        bad = tmp_path / "bad.safetensors"
        _rewrite_norms(path, bad, norms)
        with torch.device("meta"):
            skeleton = ExampleLlama(CFG)
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            bitfx.load(skeleton, bad)
        assert "forward" not in skeleton.layers[0].attn_norm.__dict__  # nothing was loaded
    # A file written before fused norms (no "norms" entry) loads, with none.
    old = tmp_path / "old.safetensors"
    _rewrite_norms(path, old, None)
    skeleton = _loaded(old)
    assert fused_norm.fused_norms(skeleton) == {}
    with torch.no_grad():
        assert torch.equal(skeleton(IDS), model(IDS))


def _kernels(fn, name):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, sum(e.device_type == torch.autograd.DeviceType.CUDA and name in e.name for e in prof.events())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_runs_each_site_as_one_kernel(dtype, monkeypatch):
    """The example model on the GPU, eager: on the first call each fused norm launches alone and
    the linears learn their siblings (nine launches a block); from the second on, each norm's
    launch computes its linears too (q, k, v; gate, up): four launches a block, where the model's
    own norms take six torch kernels each besides. The logits are the same bit for bit on every
    call and with the leads and groups off (``BITFX_EAGER_GROUPS=0``)."""
    monkeypatch.delenv("BITFX_EAGER_NORMS", raising=False)
    monkeypatch.delenv("BITFX_EAGER_GROUPS", raising=False)
    ids = torch.randint(0, 16, (2, 9), device="cuda")
    model = _quantized(_example(dtype, layers=3).cuda(), ids)
    plain, alone = copy.deepcopy(model), copy.deepcopy(model)
    for name in plain.bitfx_report.fused_norms:
        del plain.get_submodule(name).__dict__["forward"]
    with torch.no_grad():
        got = []
        for _ in range(3):
            out, n = _kernels(lambda: model(ids), "_front_gemv_kernel")
            got.append((out, n))
        monkeypatch.setenv("BITFX_EAGER_GROUPS", "0")
        each, n_alone = _kernels(lambda: alone(ids), "_front_gemv_kernel")
        monkeypatch.delenv("BITFX_EAGER_GROUPS")
        want, n_plain = _kernels(lambda: plain(ids), "_front_gemv_kernel")
    assert [n for _, n in got] == [9 * 3, 4 * 3, 4 * 3] and n_alone == 9 * 3 and n_plain == 7 * 3
    for out, _ in got:
        assert torch.equal(out, each)
    # The logits of the model's own norms: the kernel's norm differs in its last bits (reduction
    # order), so an int8 code may move by one at a rounding boundary; compared as the compiled
    # models are against eager ones (tests/test_cuda_models.py), to 5% of the logits' scale.
    scale = want.float().abs().max().item()
    torch.testing.assert_close(each.float(), want.float(), rtol=0, atol=0.05 * scale)
    # With grad to carry (the input requires grad), the model's own norm runs.
    norm = model.layers[0].attn_norm
    x = torch.randn(4, 32, device="cuda", dtype=dtype, requires_grad=True)
    _, n_grad = _kernels(lambda: norm(x), "_front_gemv_kernel")
    assert n_grad == 0
    with torch.no_grad():
        y, n_one = _kernels(lambda: norm(x), "_front_gemv_kernel")
    assert n_one == 1 and torch.equal(y, fg.front_norm(x.detach(), norm.weight.detach(), 1e-6, False, True, y.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch, fused", [("llama", 4), ("gemma", 4), ("qwen3", 4), ("bitnet", 8), ("olmo2", 0)])
def test_transformers_norms_fuse_and_compute_as_their_modules(arch, fused, dtype):
    """transformers' own norm modules: each pre-norm (and BitNet's sub-norms before o_proj and
    down_proj) gets the fused forward, in the cast order and weight form its code has (Gemma:
    ``1 + w`` in fp32, then cast), and the kernel computes what the module computes, within the
    norm's tolerance; OLMo2 normalizes after its linears (no norm feeds one): nothing to fuse."""
    from tests import models

    model, ids = getattr(models, f"tiny_{arch}")(dtype=dtype)
    model = _quantized(model.to(KERNEL_DEVICE), ids.to(KERNEL_DEVICE))
    specs = fused_norm.fused_norms(model)
    assert len(specs) == fused and sorted(model.bitfx_report.fused_norms) == sorted(specs)
    for name in specs:
        norm = model.get_submodule(name)
        x = torch.randn(5, specs[name]["K"], generator=torch.Generator().manual_seed(4)).to(dtype).to(KERNEL_DEVICE)
        with torch.no_grad():
            want = type(norm).forward(norm, x)
            got = norm.forward._launch(x, getattr(norm, specs[name]["weight"]))
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=_rel(dtype), atol=0.0)
        if dtype == torch.bfloat16:
            # One bf16 step either way is within the tolerance, and so is a wrong cast order; but
            # with the module's order, only values within an fp32 ulp or two of a bf16 rounding
            # boundary can round differently: almost none (a wrong order moves a large share).
            assert (got != want).float().mean().item() <= 0.01, (got != want).float().mean().item()


# ------------------------------------------------------------------ the norm and its linears in one launch
#
# Run here as the eager model runs them on a GPU: the norm's launch (FusedNormForward._launch)
# and each linear's direct launch (modules._launch_direct), on the device at hand (the CPU: the
# Triton interpreter; a GPU runs the same steps), launches counted as the sibling tests count them.


@pytest.fixture
def front_launches(launches, monkeypatch):
    """``front_launches(fn) -> (fn(), n)``: n the launches of the front kernel (the norm alone,
    the norm with its linears, a linear or a group of them) while ``fn`` runs (on a GPU the
    kernels the profiler saw: a bound launch does not pass through the launcher's ``__call__``)."""
    monkeypatch.delenv("BITFX_EAGER_NORMS", raising=False)
    return launches


def _block():
    model = _example().to(KERNEL_DEVICE)
    _quantized(model, IDS.to(KERNEL_DEVICE))
    b = model.layers[0]
    return model, b.attn_norm, (b.q_proj, b.k_proj, b.v_proj)


def _site(norm, linears, x):
    """The norm, then each linear on its output: ``(y, [outputs])``."""
    y = norm.forward._launch(x, norm.weight)
    return y, [modules._launch_direct(m, y, m.bias, 127) for m in linears]


def _own(layer, y):
    """The linear's own launch on ``y`` (no stash, no group): the reference for every output."""
    return modules._launch_one(layer, y, layer.bias, 127)


def _norm_alone(norm, x):
    s = norm.forward.spec
    return fg.front_norm(x.reshape(-1, x.shape[-1]), norm.weight, s["eps"], s["offset"], s["cast_before_weight"],
                         x.dtype).view(x.shape)


def _check_site(norm, linears, x, y, outs):
    assert torch.equal(y, _norm_alone(norm, x))
    for m, out in zip(linears, outs):
        assert torch.equal(out, _own(m, y)), m


def test_a_norm_learns_its_linears_then_launches_them(front_launches):
    """The first call: the norm alone and each linear alone (they form their group); then the
    norm leads q: one launch for the norm and q, k, v, each output the linear's own on ``y``,
    over 2-D and 3-D inputs and several row counts."""
    _, norm, qkv = _block()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for step, shape in enumerate([(3, 32), (1, 4, 32), (2, 32), (1, 32)]):
            x = torch.randn(*shape, generator=g).to(KERNEL_DEVICE)
            (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
            assert n == (4 if step == 0 else 1), (step, n)
            assert norm.forward.lead() is qkv[0]
            _check_site(norm, qkv, x, y, outs)


def _learned(norm, qkv, front_launches):
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(6)).to(KERNEL_DEVICE)
    _site(norm, qkv, x)
    _, n = front_launches(lambda: _site(norm, qkv, x))
    assert n == 1 and norm.forward.lead is not None
    return x


def test_what_breaks_the_lead_gives_each_linear_its_own_output(front_launches):
    """After the lead is learned: a write into the norm's output, a linear called on another
    tensor, a linear not called, its weights written: each linear's output is still its own on
    the tensor it is given; the lead is cut where the pattern broke, and learned again."""
    _, norm, (q, k, v) = _block()
    with torch.no_grad():
        x = _learned(norm, (q, k, v), front_launches)
        y = norm.forward._launch(x, norm.weight)  # q, k, v computed in this launch
        y.mul_(2.0)  # ... for the y before this write
        outs = [modules._launch_direct(m, y, m.bias, 127) for m in (q, k, v)]
        assert all(torch.equal(o, _own(m, y)) for o, m in zip(outs, (q, k, v)))
        assert norm.forward.lead is None

        x = _learned(norm, (q, k, v), front_launches)
        y = norm.forward._launch(x, norm.weight)
        other = y.clone()
        assert torch.equal(modules._launch_direct(q, other, q.bias, 127), _own(q, other))
        assert norm.forward.lead is None

        x = _learned(norm, (q, k, v), front_launches)
        y = norm.forward._launch(x, norm.weight)
        for m in (q, k):  # v is not called
            assert torch.equal(modules._launch_direct(m, y, m.bias, 127), _own(m, y))
        (y, outs), n = front_launches(lambda: _site(norm, (q, k, v), x))
        assert n == 1 + 1  # the lead cut: the norm alone, then q's group (v's output dropped, recomputed)
        _check_site(norm, (q, k, v), x, y, outs)

        x = _learned(norm, (q, k, v), front_launches)
        y = norm.forward._launch(x, norm.weight)
        k.w_scale.mul_(2.0)  # a write into a linear's weights after the launch used them
        outs = [modules._launch_direct(m, y, m.bias, 127) for m in (q, k, v)]
        _check_site(norm, (q, k, v), x, y, outs)

        x = _learned(norm, (q, k, v), front_launches)
        y = norm.forward._launch(x, norm.weight)
        k.act_bits = 4  # narrower activation codes after the launch made its 8-bit ones
        got = modules._launch_direct(k, y, k.bias, act_qmax(4))
        assert torch.equal(got, modules._launch_one(k, y, k.bias, act_qmax(4)))
        assert not torch.equal(got, _own(k, y))


def test_when_a_norm_does_not_lead(front_launches, monkeypatch):
    """No lead with ``BITFX_EAGER_GROUPS=0``, for inference tensors (no version counter to see a
    write by), or for rows beyond the one-kernel form's budget; a replaced norm weight is read."""
    _, norm, qkv = _block()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7)).to(KERNEL_DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("BITFX_EAGER_GROUPS", "0")
        for _ in range(2):
            (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
            assert n == 4 and norm.forward.lead is None
            _check_site(norm, qkv, x, y, outs)
        monkeypatch.delenv("BITFX_EAGER_GROUPS")
    with torch.inference_mode():
        for _ in range(2):
            (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
            assert n == 4 and norm.forward.lead is None
            _check_site(norm, qkv, x, y, outs)
    with torch.no_grad():
        x_learned = _learned(norm, qkv, front_launches)
    with torch.inference_mode():  # a lead learned before: not taken here, kept for later
        (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
        assert n == 4 and norm.forward.lead is not None
        _check_site(norm, qkv, x, y, outs)
    with torch.no_grad():
        _, n = front_launches(lambda: _site(norm, qkv, x_learned))
        assert n == 1
        with monkeypatch.context() as patch:
            patch.setattr(fg, "EAGER_BYTES", 0)  # more than one row: two kernels per linear
            modules._ROW_CLASSES.clear()
            (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
            assert n == 1  # the norm alone (the linears launch norm_quant and the matmul)
            _check_site(norm, qkv, x, y, outs)
        modules._ROW_CLASSES.clear()
        _learned(norm, qkv, front_launches)
        norm.weight = nn.Parameter(norm.weight.detach() * 0.5)
        (y, outs), n = front_launches(lambda: _site(norm, qkv, x))
        assert n == 1
        _check_site(norm, qkv, x, y, outs)


def test_copies_learn_their_own_leads(front_launches):
    model, norm, qkv = _block()
    with torch.no_grad():
        _learned(norm, qkv, front_launches)
        for other in (copy.deepcopy(model), _pickled(model)):
            fwd = other.layers[0].attn_norm.forward
            assert fwd.lead is None and fwd.lead_plans.plans == {} and fwd.lead_plans.sig is None
