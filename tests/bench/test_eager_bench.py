"""``python -m bitfx.bench eager --device cpu``: the smoke run of the eager benchmark (a tiny model,
the ternary ops' torch reference) goes through every form and writes its table and results."""

from __future__ import annotations

import json

from bitfx.bench import eager


def test_eager_bench_smoke_run(tmp_path, capsys):
    assert eager.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bit for bit: True" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tokens_per_s"]) == set(eager.FORMS)
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in results["forward_us"].values())
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in eager.FORMS)
