"""Eager siblings: linears called one after another on the same tensor (q, k, v; gate, up) learn
that they are, and the first then launches all of them in one kernel, leaving each sibling its
output (``bitfx.modules``, "siblings"). Every output must be what the layer alone gives, bit
for bit, whatever the caller does between the calls: write into the input, call a sibling on
another tensor, skip one, replace or write into its weights.

The logic runs here through ``modules._launch_direct`` on the device at hand (the CPU: the
Triton interpreter; the module takes this path on CUDA), as the eager plan tests do; the CUDA
tests at the end run whole eager models on the GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bitfx import modules
from bitfx.kernels import _launch
from bitfx.kernels import front_gemv as fg
from bitfx.modules import BitfxLinear
from tests.helpers import KERNEL_DEVICE

DEV = KERNEL_DEVICE
CUDA = DEV.type == "cuda"


@pytest.fixture
def launches(monkeypatch):
    """``launches(fn) -> (fn(), n)``: n the launches of the one-kernel form (single linears and
    groups alike) while ``fn`` runs: the kernels the CUDA profiler saw on a GPU; on the CPU the
    interpreter's launches, counted at the launcher (where every launch passes)."""
    monkeypatch.delenv("BITFX_FRONT_GEMV", raising=False)
    monkeypatch.delenv("BITFX_EAGER_GROUPS", raising=False)
    count = {"n": 0}
    real = _launch.Launcher.__call__

    def counting(self, *args, **kwargs):
        if self is fg._FRONT:
            count["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_launch.Launcher, "__call__", counting)

    def run(fn):
        if not CUDA:
            before = count["n"]
            out = fn()
            return out, count["n"] - before
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        return out, sum(e.device_type == torch.autograd.DeviceType.CUDA and "_front_gemv_kernel" in e.name
                        for e in prof.events())

    return run


def _layers(K=40, ns=(24, 8, 8), bias=False, seed=0):
    torch.manual_seed(seed)
    return [BitfxLinear.from_linear(torch.nn.Linear(K, n, bias=bias)).to(DEV) for n in ns]


def _alone(layer, x):
    """The layer's own launch (no group, no stash), the reference for every output here."""
    return modules._launch_one(layer, x, layer.bias, 127)


def _call(layer, x):
    return modules._launch_direct(layer, x, layer.bias, 127)


def _members(layer):
    group = layer.__dict__.get("_group")
    return None if group is None else [ref() for ref in group.refs]


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_learn_then_launch_once(launches, bias):
    """First step: three launches, and the three layers form a group in call order. Later
    steps: one launch for the three, each output bit for bit the layer's own, for 2-D and
    3-D inputs and several row counts."""
    q, k, v = _layers(bias=bias)
    with torch.no_grad():
        for step, shape in enumerate([(3, 40), (3, 40), (2, 5, 40), (1, 40)]):
            h = torch.randn(*shape, device=DEV)
            outs, launched = launches(lambda: [_call(layer, h) for layer in (q, k, v)])
            assert launched == (3 if step == 0 else 1), (step, launched)
            for layer, out in zip((q, k, v), outs):
                want = _alone(layer, h)
                assert out.shape == want.shape and out.is_contiguous()
                assert torch.equal(out, want), (step, layer.out_features)
            assert _members(q) == [q, k, v] and _members(v) == [q, k, v]


def test_a_write_into_the_input_between_siblings(launches):
    """``h`` written in place after q read it: k and v compute on what they are given, and the
    group is dissolved (it forms again where the calls repeat the pattern)."""
    q, k, v = _layers()
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for layer in (q, k, v):
            _call(layer, h)
        h = torch.randn(3, 40, device=DEV)
        _call(q, h)  # the group's launch
        h.mul_(-2.0)
        got = [_call(k, h), _call(v, h)]
        assert torch.equal(got[0], _alone(k, h)) and torch.equal(got[1], _alone(v, h))
        assert _members(q) is None or _members(q)[0] is q  # dissolved, then formed anew by the calls after
        view = h[:, :20]
        _call(q, h)
        view.add_(1.0)  # a write through a view moves the shared version counter too
        assert torch.equal(_call(k, h), _alone(k, h))


def test_a_sibling_on_another_input_or_skipped(launches):
    q, k, v = _layers()
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for layer in (q, k, v):
            _call(layer, h)
        h1, h2 = torch.randn(3, 40, device=DEV), torch.randn(3, 40, device=DEV)
        _call(q, h1)
        assert torch.equal(_call(k, h2), _alone(k, h2))  # not the output left for h1
        assert _members(q) is None  # the pattern did not hold
        # skipped: v not called after a group launch; the next launch finds its output unclaimed
        for layer in (q, k, v):
            _call(layer, h)
        for layer in (q, k, v):
            _call(layer, h)  # a group of three again
        assert _members(q) == [q, k, v]
        _call(q, h1)
        _call(k, h1)  # v skipped
        h3 = torch.randn(2, 40, device=DEV)
        outs = [_call(layer, h3) for layer in (q, k, v)]
        for layer, out in zip((q, k, v), outs):
            assert torch.equal(out, _alone(layer, h3))


def test_the_weights_written_or_replaced_between_siblings(launches):
    q, k, v = _layers()
    other = _layers(seed=1)[1]
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for _ in range(2):
            for layer in (q, k, v):
                _call(layer, h)
        h = torch.randn(3, 40, device=DEV)
        _call(q, h)
        k.w_scale.copy_(other.w_scale)  # written in place after the group's launch
        assert torch.equal(_call(k, h), _alone(k, h))
        for layer in (q, k, v):
            _call(layer, h)
        for layer in (q, k, v):
            _call(layer, h)
        _call(q, h)
        k.packed = other.packed.clone()  # replaced
        assert torch.equal(_call(k, h), _alone(k, h))
        for _ in range(2):  # the group with k's new weights: a new plan, the same numbers
            outs = [_call(layer, h) for layer in (q, k, v)]
        for layer, out in zip((q, k, v), outs):
            assert torch.equal(out, _alone(layer, h))


def test_what_does_not_group(launches, monkeypatch):
    """Layers of different row lengths or activation widths, inference tensors (no version
    counter: a write could not be seen), BITFX_EAGER_GROUPS=0, and a copy or a move of a layer."""
    q, k, v = _layers()
    wide = _layers(K=48, ns=(8,))[0]
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        _call(q, h)
        _call(wide, torch.randn(3, 48, device=DEV))
        assert _members(q) is None and _members(wide) is None
        k4 = copy.deepcopy(k)
        k4.act_bits = 4
        _call(q, h)
        got = modules._launch_direct(k4, h, k4.bias, 7)
        assert _members(q) is None and torch.equal(got, modules._launch_one(k4, h, k4.bias, 7))
    with torch.inference_mode():
        h = torch.randn(3, 40, device=DEV)
        for _ in range(2):
            outs = [_call(layer, h) for layer in (q, k, v)]
        assert _members(q) is None
        assert all(torch.equal(o, _alone(layer, h)) for o, layer in zip(outs, (q, k, v)))
    monkeypatch.setenv("BITFX_EAGER_GROUPS", "0")
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for _ in range(2):
            for layer in (q, k, v):
                _call(layer, h)
        assert _members(q) is None
        monkeypatch.setenv("BITFX_EAGER_GROUPS", "yes")
        with pytest.raises(ValueError, match="BITFX_EAGER_GROUPS"):
            _call(k, h)
        monkeypatch.delenv("BITFX_EAGER_GROUPS")
        h = torch.randn(3, 40, device=DEV)
        for layer in (q, k, v):
            _call(layer, h)
        assert _members(q) == [q, k, v]
        assert "_group" not in copy.deepcopy(q).__dict__
        v.to(DEV)
        assert _members(q) is None and _members(k) is None


def test_weights_that_cannot_launch_together(launches):
    """Biases of different dtypes (one kernel loads every part's bias through one pointer type):
    the layers group, but each launches its own kernel, with its own outputs."""
    q, k = _layers(ns=(24, 8), bias=True)
    k.bias = k.bias.to(torch.float64)
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for _ in range(2):
            outs, launched = launches(lambda: [_call(layer, h) for layer in (q, k)])
        assert _members(q) == [q, k] and launched == 2
        for layer, out in zip((q, k), outs):
            assert torch.equal(out, _alone(layer, h))


def test_rows_beyond_the_one_kernel_budget(launches, monkeypatch):
    """Where the group's rows would read more than the one-kernel form's budget, each layer
    launches its own kernels (the two-kernel form), with the same outputs."""
    monkeypatch.setattr(modules, "_ROW_CLASSES", {})
    q, k, v = _layers()
    monkeypatch.setattr(fg, "EAGER_BYTES", 1)  # one row only, as FRONT_MAX_M allows
    with torch.no_grad():
        for rows in (1, 1, 4, 4):
            h = torch.randn(rows, 40, device=DEV)
            outs, launched = launches(lambda: [_call(layer, h) for layer in (q, k, v)])
            for layer, out in zip((q, k, v), outs):
                assert torch.equal(out, _alone(layer, h))
        assert launched == 0  # 4 rows: no one-kernel launch at all
        assert _members(q) == [q, k, v]


def test_a_deleted_sibling_dissolves_the_group(launches):
    import gc

    q, k, v = _layers()
    with torch.no_grad():
        h = torch.randn(3, 40, device=DEV)
        for _ in range(2):
            for layer in (q, k, v):
                _call(layer, h)
        del v, layer
        gc.collect()
        h = torch.randn(2, 40, device=DEV)
        out = _call(q, h)
        assert torch.equal(out, _alone(q, h)) and _members(q) is None and _members(k) is None


# ------------------------------------------------------------------ whole models on the GPU


@pytest.mark.cuda
def test_eager_model_with_siblings_equals_each_layer_alone(launches, monkeypatch):
    """The main job's model converted by ``bitfx.quantize``, eager: its q/k/v and gate/up launch
    as one kernel each after the first call (four launches per block instead of seven), and
    the logits equal those with groups off, bit for bit, over a growing prompt; a sibling called
    with another stream current launches its own kernel."""
    from bitfx import quantize
    from bitfx.demo.example import ExampleConfig, ExampleLlama

    torch.manual_seed(0)
    model = ExampleLlama(ExampleConfig(vocab=64, dim=256, hidden=704, heads=8, layers=3)).cuda().eval()
    with torch.no_grad():
        quantize(model, torch.randint(0, 64, (1, 16), device="cuda"))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for T in (5, 6, 7, 40):
            ids = torch.randint(0, 64, (1, T), device="cuda")
            monkeypatch.setenv("BITFX_EAGER_GROUPS", "0")
            want = twin(ids)
            monkeypatch.delenv("BITFX_EAGER_GROUPS")
            got, n = launches(lambda: model(ids))
            assert torch.equal(got, want), T
            if T > 5:  # per block: q, k, v in one launch; o_proj; gate, up in one; down_proj
                assert n == 4 * 3, n
            torch.cuda.synchronize()
        s = torch.cuda.Stream()
        block = model.layers[0]
        h = torch.randn(1, 9, 256, device="cuda")
        q, k = block.q_proj, block.k_proj
        q(h)  # the group's launch, on the default stream
        with torch.cuda.stream(s):  # k called with another stream current: its own launch there
            got, n = launches(lambda: k(h))
            assert n == 1
        s.synchronize()
        assert torch.equal(got, twin.layers[0].k_proj(h))
        ids = torch.randint(0, 64, (1, 9), device="cuda")
        want = twin(ids)
        with torch.cuda.stream(s):  # another stream current: the layers' own launches there
            got = model(ids)
        s.synchronize()
        assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["Llama", "Qwen3", "BitNet"])
def test_transformers_models_group_their_siblings(launches, monkeypatch, arch):
    """Models the tests do not write: transformers' Llama (grouped-query attention: k and v
    narrower than q), Qwen3 (q and k normed after their projections) and BitNet, converted by
    ``bitfx.quantize`` and run eagerly. Each layer's q, k and v form one group and gate and up
    another, and the logits equal those of a copy with groups off, bit for bit. (On the CPU the
    eager direct path is opened to the interpreter's kernels, which run every program in Python:
    hence one small layer and three tokens; on a GPU it is the module's own path.)"""
    import transformers

    from bitfx import quantize
    from tests import models

    model, ids = models._hf(getattr(transformers, f"{arch}Config"), getattr(transformers, f"{arch}ForCausalLM"), 0,
                            torch.float32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    ids = ids[:1, :3]
    with torch.no_grad():
        quantize(model, ids)
    model, ids = model.to(DEV), ids.to(DEV)
    twin = copy.deepcopy(model)
    if not CUDA:
        monkeypatch.setattr(modules, "_direct_launch", lambda x, packed: (
            x.dtype.is_floating_point and x.device == packed.device and not torch.compiler.is_compiling()))
    with torch.no_grad():
        monkeypatch.setenv("BITFX_EAGER_GROUPS", "0")
        want = twin(ids).logits
        monkeypatch.delenv("BITFX_EAGER_GROUPS")
        model(ids)  # the calls that learn the groups
        got, launched = launches(lambda: model(ids).logits)
    assert torch.equal(got, want)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert _members(attn.q_proj) == [attn.q_proj, attn.k_proj, attn.v_proj]
        assert _members(mlp.gate_proj) == [mlp.gate_proj, mlp.up_proj]
        assert _members(attn.o_proj) is None and _members(mlp.down_proj) is None
    assert launched == 4 * len(model.model.layers)  # q/k/v, o_proj, gate/up, down_proj: one kernel each
