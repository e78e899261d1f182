"""``bitfx::decode_attention`` and the pass that calls it (:mod:`bitfx.passes.attention`).

The op against torch's own attention (the reference in fp32; the Triton kernel, in the
interpreter here and on the GPU, against the reference, its splits of long caches included);
the pass on transformers decode steps of a static cache (every layer's attention taken, the
logits and the cache as before the pass) and on hand-written calls it must take or leave.

Tolerances: the reference computes in fp32 what torch computes in fp32 in another order
(1e-5 relative to the output's scale); the kernel's result and the reference's are each rounded
once to the inputs' dtype from fp32 sums taken in different orders, so they differ by at most one
step of that dtype at the output's largest magnitude (2^-7 of it for bf16, 2^-10 for fp16; 2^-20,
eight steps, for fp32), plus 1e-5 of it for the fp32 sums.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import bitfx.ops  # noqa: F401
from bitfx import reference as ref
from bitfx.kernels import attention as ka
from bitfx.passes.attention import fuse_decode_attention
from tests import models
from tests.helpers import KERNEL_DEVICE

_ops = torch.ops.bitfx
_STEP = {torch.float32: 2.0 ** -20, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _inputs(B, Hq, Hk, L, D, dtype, mask_kind, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).to(device)
               for shape in ((B, Hq, 1, D), (B, Hk, L, D), (B, Hk, L, D)))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand((B, 1, 1, L), generator=g) < 0.6
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn((1, Hq, 1, L), generator=g).to(dtype)
    elif mask_kind == "none_kept":  # a query whose every key is masked out
        mask = torch.zeros((B, Hq, 1, L), dtype=torch.bool)
        mask[0, 1:] = True
    return q, k, v, None if mask is None else mask.to(device)


def _torch_attention(q, k, v, mask, scale):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), attn_mask=mask, scale=scale)


def _close(got, want, dtype):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= _STEP[dtype] * max(scale, 1.0) + 1e-5 * scale, (err, scale)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "none_kept"])
@pytest.mark.parametrize("B,Hq,Hk", [(1, 4, 4), (2, 8, 2), (1, 6, 1)])
def test_reference_is_torch_attention(B, Hq, Hk, mask_kind):
    q, k, v, mask = _inputs(B, Hq, Hk, 33, 16, torch.float32, mask_kind)
    got = ref.decode_attention(q, k, v, mask, 0.3)
    want = _torch_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if mask_kind == "none_kept":  # torch's math attention gives zeros there, and so does the op
        assert torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))


def _kernel(q, k, v, mask, scale):
    """The Triton kernel (on the GPU, or in the interpreter on CPU tensors) after the op's check."""
    from bitfx.ops.library import check_decode_attention

    check_decode_attention("decode_attention", q, k, v, mask)
    return ka.decode_attention(q, k, v, mask, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hk,L,D,mask_kind", [
    (1, 4, 2, 37, 16, "bool"),  # one program per head
    (1, 2, 1, 1300, 8, "float"),  # split over programs, then combined
    (2, 4, 4, 9, 24, None),  # head_dim not a power of two
    (1, 4, 2, 700, 16, "none_kept"),  # every key of a head masked, split
])
def test_kernel_matches_reference(B, Hq, Hk, L, D, mask_kind, dtype):
    q, k, v, mask = _inputs(B, Hq, Hk, L, D, dtype, mask_kind, device=KERNEL_DEVICE)
    got = _kernel(q, k, v, mask, D ** -0.5)
    want = ref.decode_attention(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), D ** -0.5)
    assert got.dtype == dtype and got.shape == (B, Hq, 1, D)
    _close(got.cpu(), want, dtype)
    if mask_kind == "none_kept":
        assert torch.equal(got[0, 0].cpu(), torch.zeros_like(got[0, 0].cpu()))
    if L > 1000 and KERNEL_DEVICE.type == "cpu":
        assert ka.config(B * Hq, L, D, 4)[0] > 1  # (the interpreter's nominal SMs) this case takes the split form


def test_split_rule():
    """One program per head for a short cache or a full GPU; splits of at least SPLIT_KEYS keys
    (a multiple of the key block) up to about two programs per SM otherwise; chunks cover the keys."""
    for heads, L, D, sms in [(20, 128, 128, 132), (20, 4096, 128, 132), (1, 100_000, 64, 132), (512, 8192, 128, 132),
                             (8, 513, 16, 4), (3, 2000, 256, 132)]:
        splits, chunk, block_l, warps = ka.config(heads, L, D, sms)
        assert chunk % block_l == 0 and (splits - 1) * chunk < L <= splits * chunk
        if L <= ka.SPLIT_KEYS or heads >= 2 * sms:
            assert splits == 1
        else:
            assert splits > 1 and chunk >= ka.SPLIT_KEYS and heads * (splits - 1) < 2 * sms


def test_empty_cache_and_empty_batch():
    """No key at all gives zeros (torch's attention too); no query gives an empty output."""
    q, k, v, _ = _inputs(1, 4, 2, 0, 16, torch.float32, None)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.equal(want, torch.zeros_like(q))
    assert torch.equal(ref.decode_attention(q, k, v, None, 0.25), want)
    assert torch.equal(_kernel(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE), None, 0.25).cpu(), want)
    q, k, v, _ = _inputs(0, 4, 2, 5, 16, torch.float32, None)
    assert _kernel(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE), None, 0.25).shape == (0, 4, 1, 16)


def test_kernel_reads_strided_inputs():
    """A query that is a transposed view, a cache slice with a row stride, a mask broadcast in two dims."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 4, 16, generator=g).transpose(1, 2).to(KERNEL_DEVICE)  # [1, 4, 1, 16], strided
    big_k, big_v = (torch.randn(1, 2, 50, 32, generator=g).to(KERNEL_DEVICE) for _ in range(2))
    k, v = big_k[..., :16], big_v[..., 16:]  # row stride 32
    mask = (torch.arange(50) < 31).view(1, 1, 1, 50).to(KERNEL_DEVICE)
    got = _kernel(q, k, v, mask, 0.25)
    want = ref.decode_attention(q.cpu().contiguous(), k.cpu().contiguous(), v.cpu().contiguous(), mask.cpu(), 0.25)
    _close(got.cpu(), want, torch.float32)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), Hk=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), L=st.integers(1, 700),
       D=st.sampled_from([4, 16, 40, 64]), mask_kind=st.sampled_from([None, "bool", "float"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2 ** 16))
def test_kernel_fuzzed_shapes(B, Hk, group, L, D, mask_kind, dtype, seed):
    q, k, v, mask = _inputs(B, Hk * group, Hk, L, D, dtype, mask_kind, seed=seed, device=KERNEL_DEVICE)
    got = _kernel(q, k, v, mask, 1.0 / math.sqrt(D))
    want = ref.decode_attention(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), 1.0 / math.sqrt(D))
    _close(got.cpu(), want, dtype)


def test_op_names_bad_arguments():
    q, k, v, _ = _inputs(1, 4, 2, 8, 16, torch.float32, None)
    with pytest.raises(ValueError, match="length 1"):
        _ops.decode_attention(q.expand(1, 4, 2, 16), k, v, None, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        _ops.decode_attention(q[:, :3], k, v, None, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        _ops.decode_attention(q, k.half(), v, None, 1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        _ops.decode_attention(q, k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="must both be"):
        _ops.decode_attention(q, k, v[..., :8], None, 1.0)
    with pytest.raises(TypeError, match="attention mask"):
        _ops.decode_attention(q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        _ops.decode_attention(*(t.expand(*t.shape[:-1], 300) for t in (q[..., :1], k[..., :1], v[..., :1])), None, 1.0)


# ---------------------------------------------------------------- the pass


def _decode_graph(model):
    """The Dynamo graph of ``model``'s decode step on a static cache, a function that runs it on a
    rewound cache (logits, then a copy of the cache's tensors), and the step's output before any pass."""
    from bitfx.bench.decode import Decode

    dec = Decode(model, "cpu", next(model.parameters()).dtype)
    gm, compiled = models.capture_graph(lambda t: model(input_ids=t, **dec.kwargs).logits, dec.token)

    def run():
        dec.prepare(False)
        with torch.no_grad():
            logits = compiled(dec.token)
        return logits, [t.clone() for layer in dec.cache.layers for t in (layer.keys, layer.values)]

    return gm, run, run()


def _calls(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


# transformers architectures (class prefix) beyond the tiny_* builders, and whether their decode
# step calls scaled_dot_product_attention (None: depends on the transformers release; Gemma 2's
# capped logits run in eager attention in some, through SDPA in others: the pass takes what
# the graph holds).
_ARCHS = {"Mistral": True, "Qwen2": True, "Granite": True, "Glm": True, "Phi3": True, "StableLm": True,
          "Cohere": True, "Nemotron": True, "Olmo2": True, "Gemma2": None}


def _model(name):
    if name.startswith("tiny_"):
        return getattr(models, name)()[0]
    transformers = pytest.importorskip("transformers")
    config_cls = getattr(transformers, f"{name}Config", None)
    model_cls = getattr(transformers, f"{name}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    # (the tiny vocabulary holds no real special token)
    return models._hf(config_cls, model_cls, 0, torch.float32, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)[0]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_bitnet", "tiny_qwen3", "tiny_gemma", *sorted(_ARCHS)])
def test_pass_takes_every_decode_attention(name, fresh_dynamo):
    pytest.importorskip("transformers")
    model = _model(name)
    gm, run, (logits, cache) = _decode_graph(model)
    calls = _calls(gm, F.scaled_dot_product_attention)
    layers = model.config.num_hidden_layers
    if _ARCHS.get(name, True) is None:
        assert calls in (0, layers)
        layers = calls
    else:
        assert calls == layers
    assert fuse_decode_attention(gm) == layers
    assert _calls(gm, _ops.decode_attention.default) == layers
    assert _calls(gm, F.scaled_dot_product_attention) == 0
    repeats = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"
               and len(n.meta["example_value"].shape) == 5]
    assert not repeats or not layers  # the cache's repeats went with the library call
    logits2, cache2 = run()
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    # the cache writes stayed: the first layer's exactly (nothing before them changed), the later
    # layers' as the logits (they read the earlier layers' attention)
    assert torch.equal(cache2[0], cache[0]) and torch.equal(cache2[1], cache[1])
    for a, b in zip(cache2[2:], cache[2:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def _graph_of(fn, *args):
    gm, compiled = models.capture_graph(fn, *args)
    with torch.no_grad():
        before = compiled(*args)
    return gm, (lambda: compiled(*args)), before


_FORMS = {
    "expand": lambda k, n: k[:, :, None, :, :].expand(k.shape[0], k.shape[1], n, *k.shape[2:]).reshape(
        k.shape[0], k.shape[1] * n, *k.shape[2:]),
    "unsqueeze": lambda k, n: k.unsqueeze(2).expand(-1, -1, n, -1, -1).reshape(k.shape[0], k.shape[1] * n, *k.shape[2:]),
    # a repeat the pass does not know: its heads are read as they are (one per query head)
    "tiled": lambda k, n: k.repeat(1, n, 1, 1),
    "repeat_interleave": lambda k, n: k.repeat_interleave(n, dim=1),
    "same_heads": lambda k, n: k,
}


@pytest.mark.parametrize("form", sorted(_FORMS))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_pass_takes_repeat_forms(form, mask_kind, fresh_dynamo):
    n = 1 if form == "same_heads" else 2
    q, k, v, mask = _inputs(1, 4, 4 // n, 20, 16, torch.float32, mask_kind)
    repeat = _FORMS[form]

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, repeat(k, n), repeat(v, n), attn_mask=mask) * 2

    gm, run, before = _graph_of(attend, q, k, v, mask)
    assert fuse_decode_attention(gm) == 1
    (op,) = [n for n in gm.graph.nodes if n.target is _ops.decode_attention.default]
    bypassed = form not in ("tiled", "same_heads")
    assert (op.args[1].op == "placeholder") == (bypassed or form == "same_heads")  # the cache itself, not a copy
    torch.testing.assert_close(run(), before, rtol=1e-5, atol=1e-6)


def test_pass_takes_enable_gqa(fresh_dynamo):
    q, k, v, mask = _inputs(1, 6, 2, 20, 8, torch.float32, "bool")
    gm, run, before = _graph_of(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                                q, k, v, mask)
    assert fuse_decode_attention(gm) == 1
    torch.testing.assert_close(run(), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["prefill", "causal", "dropout"])
def test_pass_leaves_other_attention(case, fresh_dynamo):
    q, k, v, mask = _inputs(1, 4, 2, 20, 16, torch.float32, "bool")
    if case == "prefill":
        q = torch.randn(1, 4, 3, 16)
    kw = {"is_causal": True, "attn_mask": None} if case == "causal" else {"attn_mask": mask}
    if case == "dropout":
        kw["dropout_p"] = 0.5

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), **kw)

    gm, _ = models.capture_graph(attend, q, k, v)
    assert fuse_decode_attention(gm) == 0
    assert _calls(gm, F.scaled_dot_product_attention) == 1


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("builder", ["tiny_llama", "tiny_bitnet"])
def test_backend_decode_step_on_cuda(builder, dtype, monkeypatch, fresh_dynamo):
    """A decode step on a static cache compiled by the backend under CUDA graphs calls
    ``decode_attention`` in every layer (none with ``BITFX_FUSE_ATTENTION=0``), and its logits
    agree with that compile's up to code flips (attention in another order of fp32 sums, rounded
    to the model's dtype, can move a later activation code by one)."""
    from bitfx.bench.decode import Decode
    from tests.helpers import assert_close_up_to_code_flips
    from tests.test_backend import op_counts, recording_backend

    model, _ = getattr(models, builder)(dtype=dtype)
    model = model.cuda()
    outs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("BITFX_FUSE_ATTENTION", fuse)
        torch._dynamo.reset()
        dec = Decode(model, "cuda", dtype)
        backend, graphs = recording_backend()
        step = torch.compile(lambda t: model(input_ids=t, **dec.kwargs).logits, backend=backend, fullgraph=True,
                             mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                dec.prepare(True)
                out = step(dec.token).clone()
        outs[fuse] = out.float()
        taken = op_counts(graphs[0])["decode_attention"]
        assert taken == (model.config.num_hidden_layers if fuse == "1" else 0)
    assert_close_up_to_code_flips(outs["1"], outs["0"], flipped_rows=1)


def test_pass_then_inductor_reads_the_updated_cache(fresh_dynamo):
    """Compiled through AOTAutograd and Inductor (the CPU here), the op reads the cache as the
    step's in-place write left it: the logits equal the uncompiled step's, token after token."""
    pytest.importorskip("transformers")
    from torch._inductor.compile_fx import compile_fx

    from bitfx.bench.decode import Decode

    model, _ = models.tiny_llama()
    taken = []

    def backend(gm, inputs):
        taken.append(fuse_decode_attention(gm))
        return compile_fx(gm, inputs)

    dec = Decode(model, "cpu", torch.float32)
    eager_dec = Decode(model, "cpu", torch.float32)
    step = torch.compile(lambda t: model(input_ids=t, **dec.kwargs).logits, backend=backend, fullgraph=True)
    token = dec.token
    with torch.no_grad():
        for _ in range(3):  # no rewind: each step writes the next slot and attends to it
            got = step(token)
            want = model(input_ids=token, **eager_dec.kwargs).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
            token = want[:, -1:].argmax(-1)
    assert taken == [model.config.num_hidden_layers]


def test_pass_takes_a_cache_of_symbolic_length(fresh_dynamo):
    """A cache that grows between calls (Dynamo recompiles with its length symbolic) is still
    taken, and right at every length; ``dynamic=True``, which makes the heads and head_dim
    symbolic too, keeps the library call (the group and the head_dim limit need their values)."""
    taken = []

    def backend(gm, inputs):
        taken.append(fuse_decode_attention(gm))
        return gm

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, _FORMS["expand"](k, 2), _FORMS["expand"](v, 2), attn_mask=mask)

    grown = torch.compile(attend, backend=backend, fullgraph=True)
    for L in (7, 9, 13):
        q, k, v, mask = _inputs(1, 4, 2, L, 16, torch.float32, "bool", seed=L)
        torch.testing.assert_close(grown(q, k, v, mask), _torch_attention(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-6)
    assert taken == [1, 1]  # the first length, then one graph for every length
    torch._dynamo.reset()
    taken.clear()
    torch.compile(attend, backend=backend, fullgraph=True, dynamic=True)(q, k, v, mask)
    assert taken == [0]
