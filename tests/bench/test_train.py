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
