"""CPU checks of the whole-model benchmark (``python -m bitfx.bench models``), which itself needs
a GPU: the table's ratios, the bytes-per-token count against a hand count from the config, and
the model configs (tiny and full size, :mod:`bitfx.bench.model_shapes`) built on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from bitfx.bench import model_shapes as ms  # noqa: E402
from bitfx.bench import models as bm  # noqa: E402


def _row(model, method, **kw):
    return {"model": model, "method": method, "errors": {}, **kw}


def test_render_ratios():
    results = {
        "header": "device: test",
        "rows": [
            _row("m", "bf16-inductor", linears_converted=0, linears_total=113, decode_ms_graphs=10.0,
                 decode_ms_graphs_synced=12.0, decode_ms_default=20.0, kernels_per_step=400, gpu_us_per_step=9000.0, host_us_per_op=50.0,
                 bytes_per_token=30e6, floor_ms=0.01, share_of_floor=0.001, generate_tok_s=100.0,
                 eager_generate_tok_s=40.0),
            _row("m", "bitfx", linears_converted=112, linears_total=113, decode_ms_graphs=4.0,
                 decode_ms_graphs_synced=6.0, decode_ms_default=25.0, kernels_per_step=500, gpu_us_per_step=3000.0, host_us_per_op=50.0,
                 bytes_per_token=8e6, floor_ms=0.002, share_of_floor=0.5, generate_tok_s=250.0,
                 eager_generate_tok_s=30.0, errors={"generate": "RuntimeError: boom"}),
            _row("other", "bitfx", decode_ms_graphs=1.0),  # no baseline for this model: no ratios
        ],
    }
    table = bm.render(results)
    lines = table.splitlines()
    assert lines[0] == "device: test"
    rows = {tuple(c.strip() for c in ln.strip("|").split("|")[:2]): [c.strip() for c in ln.strip("|").split("|")]
            for ln in lines if ln.startswith("| m ") or ln.startswith("| other ")}
    base, bit, other = rows[("m", "bf16-inductor")], rows[("m", "bitfx")], rows[("other", "bitfx")]
    assert len(base) == len(bit) == 19
    # columns: 2 linears, 3 graphs ms, 4 vs, 5 synced ms, 6 vs, 7 default ms, 8 vs, ..., 12 MB, 14 share,
    # 15 tok/s, 16 vs, 17 eager tok/s, 18 vs
    assert base[2] == "0/113" and bit[2] == "112/113"
    assert base[4] == "1.00x" and base[6] == "1.00x" and base[8] == "1.00x" and base[16] == "1.00x"
    assert bit[3] == "4.000" and bit[4] == "2.50x"  # 10 ms / 4 ms
    assert bit[5] == "6.000" and bit[6] == "2.00x"  # 12 ms / 6 ms
    assert bit[7] == "25.000" and bit[8] == "0.80x"  # 20 ms / 25 ms: slower
    assert bit[15] == "250.0" and bit[16] == "2.50x"  # 250 / 100 tok/s
    assert bit[12] == "8.0" and bit[14] == "50%"
    assert bit[17] == "30.0" and bit[18] == "0.75x" and base[18] == "1.00x"  # 30 / 40 tok/s, eager
    assert other[4] == "—" and other[5] == "—"
    assert "m bitfx generate: RuntimeError: boom" in table


def _dense_bytes(shape, elt=2):
    return math.prod(shape) * elt


def test_bytes_per_token_tiny_llama_by_hand():
    """Dense: every weight at 2 bytes, the embedding one row, the tied head the whole matrix.
    Converted by bitfx.quantize: those linears at N * ceil(K/4) + 4 N bytes."""
    import bitfx

    c = ms.make_config("llama-1b", tiny=True)
    assert c.tie_word_embeddings
    V, H, I, L = c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    # (N, K) of each linear of a layer, by the name's last part
    linears = {"q_proj": (q_out, H), "k_proj": (kv_out, H), "v_proj": (kv_out, H), "o_proj": (H, q_out),
               "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    norms_per_layer = 2 * H * 2
    fixed = L * norms_per_layer + H * 2 + H * 2 + V * H * 2  # layer norms, final norm, embedding row, head

    model = ms.build_model(c, "cpu")
    dense = fixed + L * sum(_dense_bytes(s) for s in linears.values())
    assert bm.bytes_per_token(model) == dense
    assert bm.count_linears(model) == (0, 7 * L + 1)

    with torch.no_grad():
        bitfx.quantize(model, torch.arange(1, 9)[None], use_cache=False)
    converted = {n for n, m in model.named_modules() if isinstance(m, bitfx.BitfxLinear)}
    assert {f"model.layers.{i}.self_attn.q_proj" for i in range(L)} <= converted
    assert "lm_head" not in converted
    want = fixed
    for i in range(L):
        for part, (N, K) in linears.items():
            name = f"model.layers.{i}.{'mlp' if part.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{part}"
            if name in converted:
                assert math.ceil(K / 4) % 16 == 0  # no row padding at these sizes
                want += N * math.ceil(K / 4) + 4 * N
            else:
                want += _dense_bytes((N, K))
    assert bm.bytes_per_token(model) == want
    assert bm.count_linears(model) == (len(converted), 7 * L + 1)


def test_bytes_per_token_int8_head():
    """An int8 head (tied to the embedding before): V * H codes + 4 V bytes of scales, and the
    embedding one row; the same whether bitfx.quantize made it or the backend reads it."""
    import bitfx

    c = ms.make_config("llama-1b", tiny=True)
    V, H = c.vocab_size, c.hidden_size
    model = ms.build_model(c, "cpu")
    dense = bm.bytes_per_token(model)
    backend = bm.bytes_per_token(model, int8=("lm_head",))
    assert backend == dense - V * H * 2 + V * H + 4 * V
    with torch.no_grad():
        bitfx.quantize(model, torch.arange(1, 9)[None], use_cache=False, config=bitfx.BitfxConfig(head="int8"))
    packed = sum(m.packed.numel() + 4 * m.w_scale.numel() for m in model.modules() if isinstance(m, bitfx.BitfxLinear))
    dense_linears = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert dense_linears == 0  # every linear ternary, the head int8
    assert bm.count_linears(model) == (7 * c.num_hidden_layers, 7 * c.num_hidden_layers + 1)
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    assert bm.bytes_per_token(model) == packed + norms + H * 2 + V * H + 4 * V


def test_bytes_per_token_untied_head():
    c = ms.make_config("llama-8b", tiny=True)
    assert not c.tie_word_embeddings
    with torch.device("meta"):
        model = ms.model_class(c)(c).to(torch.bfloat16)
    total = sum(p.numel() for p in model.parameters()) * 2
    # every parameter once, except that the embedding reads one row instead of its matrix
    assert bm.bytes_per_token(model) == total - c.vocab_size * c.hidden_size * 2 + c.hidden_size * 2


@pytest.mark.parametrize("name", list(bm.MODELS))
def test_configs_build(name):
    tiny = ms.make_config(name, tiny=True)
    model = ms.build_model(tiny, "meta")
    assert model.config.model_type == ("bitnet" if name.startswith("bitnet") else "llama")
    assert len(model.model.layers) == 2 and next(model.parameters()).dtype == torch.bfloat16
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tiny.tie_word_embeddings

    full = ms.make_config(name)
    with torch.device("meta"):
        big = ms.model_class(full)(full)
    params = sum(p.numel() for p in big.parameters())
    published = {"llama-1b": 1_235_814_400, "llama-8b": 8_030_261_248}  # Llama-3.2-1B, Llama-3-8B
    if name in published:
        assert params == published[name]
    else:  # BitNet b1.58 2B4T: about 2.4 billion with the tied embedding
        assert 2.3e9 < params < 2.5e9
        assert full.hidden_act == "relu2" and full.tie_word_embeddings
    assert full.vocab_size == 128256


def test_bench_dispatches_models(monkeypatch):
    """``python -m bitfx.bench models LIST ...`` runs this benchmark with the rest of the line, and
    so does the earlier form ``python -m bitfx.bench --models LIST ...``."""
    from bitfx.bench.__main__ import main

    seen = []
    monkeypatch.setattr(bm, "main", lambda argv: seen.append(argv) or 0)
    assert main(["models", "llama-1b", "--quick"]) == 0
    assert main(["--models", "llama-1b", "--quick"]) == 0
    assert seen == [["llama-1b", "--quick"]] * 2
    args = bm.parse_args(seen[0])
    assert args.models == ["llama-1b"] and args.quick
    assert bm.parse_args(["--quick"]).models == list(bm.MODELS)


def test_launch_option_reaches_the_backend(monkeypatch):
    """``--launch`` picks who launches bitfx's kernels in the compiled steps (BitfxConfig.launch);
    the baseline's compile is untouched; an unknown value is refused."""
    assert bm.parse_args(["--quick"]).launch == "auto"  # BitfxConfig's default
    assert bm.parse_args(["--quick", "--launch", "inductor"]).launch == "inductor"
    with pytest.raises(SystemExit):
        bm.parse_args(["--quick", "--launch", "triton"])
    calls = []

    def compile_(model, **kw):  # torch.compile's own rule: a mode or options, not both
        if kw.get("mode") is not None and kw.get("options") is not None:
            raise RuntimeError("Either mode or options can be specified, but both can't be specified at the same time.")
        calls.append(kw)

    monkeypatch.setattr(bm.torch, "compile", compile_)
    bm._compile(None, "bitfx", None, "auto")
    bm._compile(None, "bitfx", "reduce-overhead", "auto")
    bm._compile(None, "bitfx", "reduce-overhead", "op")
    bm._compile(None, bm.BASELINE, "reduce-overhead", "auto")
    bm._compile(None, "bitfx", None, "inductor")
    # the default launch passes nothing; another one joins the options, with the mode's settings
    assert calls == [dict(backend="bitfx", mode=None),
                     dict(backend="bitfx", mode="reduce-overhead"),
                     dict(backend="bitfx", options={"launch": "op", "triton.cudagraphs": True}),
                     dict(mode="reduce-overhead"),
                     dict(backend="bitfx", options={"launch": "inductor"})]


def test_head_and_extra_options_reach_the_backend(monkeypatch):
    """``--head`` and ``--option KEY=VALUE`` (typed: bools, ints, floats, strings) join the bitfx
    methods' compile options, never the baseline's; a malformed option is refused."""
    a = bm.parse_args(["--quick", "--head", "int8", "--option", "static_launch_user_defined_triton_kernels=true",
                       "--option", "k=3", "--option", "x=0.5", "--option", "s=abc"])
    assert a.head == "int8"
    assert a.option == {"static_launch_user_defined_triton_kernels": True, "k": 3, "x": 0.5, "s": "abc"}
    with pytest.raises(SystemExit):
        bm.parse_args(["--quick", "--option", "novalue"])
    calls = []
    monkeypatch.setattr(bm.torch, "compile", lambda model, **kw: calls.append(kw))
    bm._compile(None, "bitfx", None, "auto", "int8", {"k": 3})
    bm._compile(None, "bitfx", "reduce-overhead", "auto", "dense", {"k": 3})
    bm._compile(None, bm.BASELINE, None, "auto", "int8", {"k": 3})
    assert calls == [dict(backend="bitfx", options={"head": "int8", "k": 3}),
                     dict(backend="bitfx", options={"k": 3, "triton.cudagraphs": True}),
                     dict(mode=None)]


def test_timeline_counts_overlaps_once_and_the_gaps_as_idle():
    """Kernels at [0, 10], [5, 12] (overlapping, as PDL kernels do), [20, 25], a memset at
    [12, 20] and an annotation spanning everything: span 25 µs, busy 17 (12 + 5), idle 8."""
    from types import SimpleNamespace

    from bitfx.bench.profiling import timeline

    def event(name, start, end, device="DeviceType.CUDA", annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation, activity_type="kernel",
                               time_range=SimpleNamespace(start=start, end=end))

    prof = SimpleNamespace(events=lambda: [
        event("gemv", 0, 10), event("norm", 5, 12), event("Memset (Device)", 12, 20), event("add", 20, 25),
        event("step", 0, 30, annotation=True), event("aten::mm", 0, 40, device="DeviceType.CPU")])
    assert timeline(prof) == {"span_us": 25.0, "busy_us": 17.0, "idle_us": 8.0}
    assert timeline(SimpleNamespace(events=lambda: [])) == {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0}
