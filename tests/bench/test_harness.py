"""The benchmarks' shared harness on the CPU: the wall-clock timers, the report helpers and the
model shapes defined once."""

from __future__ import annotations

import json
import math

import pytest

from bitfx.bench import model_shapes, report, timing


def test_wall_clock_timers_on_the_cpu():
    calls = []
    out, ms, wall_s = timing.timed(lambda: calls.append(1) or 7, cuda=False)
    assert out == 7 and calls == [1] and ms == pytest.approx(wall_s * 1e3) and wall_s >= 0
    assert timing.median_s(lambda: calls.append(1), reps=5, warmup=2, cuda=False) >= 0
    assert len(calls) == 1 + 7
    assert timing.wall_median_s(lambda: calls.append(1), reps=3, cuda=False) >= 0
    assert len(calls) == 8 + 4  # one warm-up call, then the timed ones


def test_rotating_copies_overflow_l2():
    assert timing.copies_for(1) == 64 and timing.copies_for(10**12) == 2
    w = 16 * 2**20
    assert timing.copies_for(w) * w >= 4 * timing.L2_BYTES


def test_cells_and_ratios():
    nan = float("nan")
    assert report.fmt(None, ".1f") == "—" and report.fmt(nan, ".1f", "n/a") == "n/a" and report.fmt(3, "d") == "3"
    assert report.times(10.0, 4.0) == "2.50x" and report.times(None, 4.0) == "—" and report.times(1.0, nan, "n/a") == "n/a"
    assert math.isnan(report.ratio(1.0, 0.0)) and report.ratio(3.0, 2.0) == 1.5
    assert report.md_head(["a", "b"], "---:") == ["| a | b |", "|---:|---:|"]
    head = report.header("gpu", {"torch": "2", "python": "3.11"}, report.command("sites", ["--quick"]), "extra")
    assert head == "device: gpu; torch 2; command: python -m bitfx.bench sites --quick; extra"


def test_write_results(tmp_path):
    report.write_results(str(tmp_path / "o"), {"a": 1}, "| t |", table_name="tables.md")
    assert json.loads((tmp_path / "o" / "results.json").read_text()) == {"a": 1}
    assert (tmp_path / "o" / "tables.md").read_text() == "| t |\n"


def test_site_shapes_are_the_llama_projections():
    assert model_shapes.SITE_SHAPES == [(8192, 8192), (4096, 4096), (4096, 14336), (14336, 4096)]
    assert set(model_shapes.TINY) == set(model_shapes.MODELS)
