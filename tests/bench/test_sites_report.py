"""The site benchmark's report (``python -m bitfx.bench sites``), built on the CPU from the H100
run kept in docs/ (no GPU needed)."""

from __future__ import annotations

import json
import pathlib

from bitfx.bench import sites

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "bench-h100-results.json"


def test_report_of_the_kept_run():
    results = json.loads(RESULTS.read_text())
    table = sites.render(results, sites.SWEEP_M)
    lines = table.splitlines()
    assert lines[0] == results["header"]
    site_rows = [line for line in lines if line.startswith(("| decode |", "| small batch |", "| prefill |"))]
    assert len(site_rows) == len(results["sites"]) == 10
    # each row's ratio is the run's own bf16 time over its bitfx time
    first = results["sites"][0]
    assert f"{first['bf16_us'] / first['bitfx_us']:.2f}x" in site_rows[0]
    # n/a where a baseline was not measured (torch._int_mm needs M > 16)
    assert site_rows[0].count("n/a") == 2
    tr = results["training"]
    ops = 6 * tr["M"] * tr["K"] * tr["N"] / tr["bitfx_us"] / 1e6
    assert f"({ops:.0f} TOP/s-equivalent" in table
    sweep_rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(r.split("|")[1]) for r in sweep_rows] == sites.SWEEP_M
    assert all(len(r.split("|")) == len(sites.SHAPES) + 3 for r in sweep_rows)
