"""The training benchmark's (``python -m bitfx.bench train``) table and shapes, on the CPU (the
measurements need a GPU)."""

from __future__ import annotations

import pytest

from bitfx.bench import train as bt
from bitfx.bench.model_shapes import make_config


def test_render_ratios_per_world_size():
    rows = [
        dict(model="m", method="bf16-inductor", world=1, tokens_per_step=8192, step_ms=100.0, tokens_per_s=81920.0,
             peak_gib=10.0, first_loss=12.0, last_loss=11.0),
        dict(model="m", method="bitfx", world=1, tokens_per_step=8192, step_ms=80.0, tokens_per_s=102400.0,
             peak_gib=8.0, first_loss=12.0, last_loss=11.5),
        dict(model="m", method="bitfx", world=2, tokens_per_step=16384, step_ms=90.0, tokens_per_s=182044.0,
             peak_gib=4.0, first_loss=12.0, last_loss=11.5),
    ]
    table = bt.render({"header": "h", "rows": rows})
    lines = [ln for ln in table.splitlines() if ln.startswith("| m ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert cells[0][5] == "1.00x" and cells[0][8] == "1.00x"
    assert cells[1][5] == "1.25x"  # 100 ms / 80 ms
    assert cells[1][8] == "0.80x"  # 8 GiB / 10 GiB
    assert cells[2][5] == "—"  # no bf16 row with 2 GPUs in this run
    assert cells[1][9] == "12.000 → 11.500"


def test_shapes_are_the_named_sizes():
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        n350 = sum(p.numel() for p in LlamaForCausalLM(make_config("llama-350m")).parameters())
        n1b = sum(p.numel() for p in LlamaForCausalLM(make_config("llama-1b")).parameters())
    assert 3.0e8 < n350 < 4.0e8  # tied embeddings: 131M + 12 layers of 16.8M
    assert n1b == 1_235_814_400  # Llama-3.2-1B
    assert bt.batch_of("llama-1b", False, None) == (4, 2048)


def test_launch_option_reaches_the_backend(monkeypatch):
    """``--launch`` sets BitfxConfig.launch for both bitfx methods; the baseline is untouched."""
    calls = []
    monkeypatch.setattr(bt.torch, "compile", lambda model, **kw: calls.append(kw))
    bt._compile(None, "bitfx-fp8", "all", "inductor")
    bt._compile(None, "bf16-inductor", "all", "inductor")
    assert calls == [dict(backend="bitfx", options={"linears": "all", "backward": "fp8", "launch": "inductor"}), {}]


def test_a_method_names_its_own_launch(monkeypatch):
    """``bitfx@inductor`` against ``bitfx@op`` in one run; an unknown method or launch mode is an
    error before anything is measured, not a silent bf16 row."""
    calls = []
    monkeypatch.setattr(bt.torch, "compile", lambda model, **kw: calls.append(kw.get("options", {}).get("launch")))
    bt._compile(None, "bitfx@inductor", "all", "op")
    bt._compile(None, "bitfx-fp8@op", "all", "inductor")
    bt._compile(None, "bitfx", "all", "inductor")
    assert calls == ["inductor", "op", "inductor"]
    for bad, why in (("bitfx-int4", "unknown method"), ("bitfx@triton", "launch mode 'triton'"),
                     ("bf16-inductor@op", "only the bitfx methods")):
        with pytest.raises(ValueError, match=why):
            bt.method_parts(bad)
    with pytest.raises(SystemExit):
        bt.main(["--methods", "bf16-inductor,bitfx@nope", "--device", "cpu"])


def test_render_compile_breakdown():
    rows = [
        dict(model="m", method="bf16-inductor", world=1, compile_s=30.0,
             compile_phases={"forward": 20.0, "backward": 8.0, "compile": 28.0, "tuned_tile": 0.0}),
        dict(model="m", method="bitfx", world=1, compile_s=45.0,
             compile_phases={"forward": 25.0, "backward": 9.0, "codegen": 4.0, "compile": 34.0, "tuned_tile": 6.0}),
    ]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in bt.render_compile(rows).splitlines()
             if ln.startswith("| m ")]
    assert cells[1][3:6] == ["45.0", "1.50x", "25.0"]
    assert cells[1][6] == "9.0" and cells[1][7] == "—" and cells[1][8] == "4.0"  # backward, aot_trace, codegen
    assert cells[1][-2] == "6.0" and cells[1][-1] == "5.0"  # 45 - 34 compiled - 6 tuned
    assert cells[0][-1] == "2.0" and cells[0][8] == "—"  # a phase not timed


def test_compile_phases_times_a_compile_and_the_tile_measurement(fresh_dynamo, monkeypatch):
    import torch

    import bitfx.kernels.matmul_config as mc
    import bitfx.kernels.ternary_matmul as tm
    from bitfx.bench.profiling import compile_phases

    original = tm._tuned_tile
    f = torch.compile(lambda x: (x * 2).sin())
    with compile_phases() as nothing_tuned:
        f(torch.randn(8))
    assert nothing_tuned.seconds["forward"] > 0
    assert nothing_tuned.seconds["compile"] >= nothing_tuned.seconds["forward"]
    assert nothing_tuned.seconds["tuned_tile"] == 0.0
    monkeypatch.setitem(mc._TUNED, (128, 1, 1, torch.device("cpu")), (64, 64))  # a measured tile, cached
    with compile_phases() as tuned:
        assert tm._tuned_tile is not original  # the matmul's calls go through the timer
        assert tm._tuned_tile(1, 1, 1, torch.device("cpu")) == (64, 64)
    assert tm._tuned_tile is original
    assert tuned.seconds["tuned_tile"] > 0 and tuned.seconds["forward"] == 0.0


def test_host_ms_times_each_phase():
    """``host_ms`` reads the marks the step leaves: per phase, the median over the steps."""
    marks = [0.0, 0.0, 0.0, 0.0]
    spans = iter([(1.0, 3.0, 4.0), (2.0, 5.0, 6.0), (3.0, 4.0, 8.0)])  # seconds after the step's start

    def step():
        f, b, o = next(spans)
        marks[:] = [10.0, 10.0 + f, 10.0 + b, 10.0 + o]

    host = bt.host_ms(step, marks, cuda=False, steps=3)
    assert host == {"forward": 2000.0, "backward": 2000.0, "optimizer": 1000.0, "all": 6000.0}
    row = dict(model="m", method="bitfx", world=1, step_ms=8000.0, host_ms=host)
    line = [ln for ln in bt.render_host([row, dict(model="m", method="x", world=1, step_ms=1.0)]).splitlines()
            if ln.startswith("| m ")]
    assert len(line) == 1 and line[0].split("|")[-2].strip() == "0.75"  # 6000 host ms of an 8000 ms step


def _busy(n):
    return sum(i * i for i in range(n))


def test_host_profile_names_where_a_step_spends_its_time():
    """``host_profile`` keeps the functions with the most own time, per step (calls and ms
    divided by the steps), and the table names them."""
    def step():
        for _ in range(3):
            _busy(200_000)

    entries = bt.host_profile(step, cuda=False, runs=2, top=4)
    assert len(entries) == 4
    busy = [e for e in entries if e["function"].endswith("(_busy)")]
    assert busy and busy[0]["calls"] == 3  # three calls in each of the two steps
    assert busy[0]["function"].startswith("bench/test_train.py:")
    assert busy[0]["cumulative_ms"] >= busy[0]["own_ms"] > 0
    assert [e["own_ms"] for e in entries] == sorted((e["own_ms"] for e in entries), reverse=True)
    row = dict(model="m", method="bitfx", world=1, host_profile=entries)
    table = bt.render_host_profile({"rows": [row, dict(model="m", method="bf16-inductor", world=1)]})
    assert table.startswith("m / bitfx / 1 GPU(s):") and "(_busy)` | 3 |" in table
    assert "bf16-inductor" not in table
