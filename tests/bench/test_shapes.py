"""The random-shape benchmark's drawing and report, on the CPU (no GPU needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitfx.bench import shapes as bs


def test_draw_shapes_bounds():
    for seed in range(5):
        shapes = bs.draw_shapes(40, seed)
        assert len(shapes) == 40
        assert len(set(shapes)) == 40
        for M, K, N in shapes:
            assert all(isinstance(v, int) for v in (M, K, N))
            assert 1 <= M <= 8192
            for d in (K, N):
                assert d % 128 == 0 and 1024 <= d <= 32768


def test_draw_shapes_deterministic_and_seeded():
    assert bs.draw_shapes(40, 0) == bs.draw_shapes(40, 0)
    assert bs.draw_shapes(40, 7) == bs.draw_shapes(40, 7)
    assert bs.draw_shapes(40, 0) != bs.draw_shapes(40, 1)
    assert bs.draw_shapes(0, 0) == []
    assert len(bs.draw_shapes(1, 0)) == 1


def test_draw_shapes_covers_small_and_large_m():
    for seed in range(5):
        ms = [M for M, _, _ in bs.draw_shapes(40, seed)]
        assert sum(M <= 16 for M in ms) >= 10  # one draw in four is forced into 1..16
        assert sum(M == 1 for M in ms) >= 5  # half of those are decode
        assert any(M >= 1024 for M in ms)
        ks = [K for _, K, _ in bs.draw_shapes(40, seed)]
        assert min(ks) < 4096 < max(ks)  # K spread too, not stuck at one end


def test_each_run_draws_fresh_shapes_and_names_its_seed(monkeypatch, capsys):
    """No --seed: a new seed each run, printed so that the run can be repeated with --seed."""
    seeds = {bs.fresh_seed() for _ in range(8)}
    assert len(seeds) > 1 and all(0 <= s < 2**31 for s in seeds)
    drawn = []
    monkeypatch.setattr(bs, "draw_shapes", lambda n, seed: drawn.append(seed) or [(1, 1024, 1024)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # stops after drawing
    for _ in range(2):
        with pytest.raises(SystemExit):
            bs.main([])
    assert len(drawn) == 2 and drawn[0] != drawn[1]  # (equal with probability 2^-31)
    with pytest.raises(SystemExit):
        bs.main(["--seed", "5"])
    assert drawn[-1] == 5


def test_parse_shapes():
    assert bs.parse_shapes("1,4096,4096;16, 8192,8192;") == [(1, 4096, 4096), (16, 8192, 8192)]
    with pytest.raises(ValueError):
        bs.parse_shapes("1,4096")
    with pytest.raises(ValueError):
        bs.parse_shapes("0,4096,4096")


def test_plan_memory_caps_and_guards():
    big = bs.plan_memory(8192, 32768, 32768)
    assert big["n_bf16"] >= 2 and big["n_bf16"] * 2 * 32768 * 32768 <= bs.MAX_BF16_WEIGHT_BYTES
    assert big["peak_bytes"] < bs.MEMORY_GUARD_BYTES  # the whole shape space fits the guard
    small = bs.plan_memory(1, 1024, 1024)
    assert small["n_bf16"] >= 2 and small["n_packed"] >= 2
    huge = bs.plan_memory(8192, 65536, 131072)  # beyond the space: one copy, and over the guard
    assert huge["n_bf16"] == 1 and huge["peak_bytes"] > bs.MEMORY_GUARD_BYTES


def test_kernel_choice_uses_the_launcher_dispatch():
    from bitfx.kernels import ternary_matmul as tm

    for M in (1, 16, 4096):
        c = bs.kernel_choice(M, 4096, 4096, torch.device("cpu"))
        assert c["path"] == tm._default_path(M)
        assert c["split_k"] >= 1 and c["tile"]


def _row(M, K, N, bitfx, bf16, comp, err=1e-5, status="ok", reason="", path="tc"):
    return dict(M=M, K=K, N=N, status=status, reason=reason, err=err, bitfx_us=bitfx, bf16_us=bf16,
                bf16_compile_us=comp, path=path, tile="128x256x64", split_k=1)


def test_render_sorted_by_ratio_with_summary():
    nan = float("nan")
    results = {
        "header": "device: test",
        "rows": [
            _row(4096, 8192, 8192, 500.0, 800.0, 750.0),  # 1.50x
            _row(1, 8192, 8192, 10.0, 65.0, 55.0, path="dp4a"),  # 5.50x, decode, K*N >= 2^24
            _row(1, 2048, 2048, 5.0, 12.0, 11.0, path="dp4a"),  # 2.20x, decode but small K*N
            _row(512, 2048, 1024, 40.0, 40.0, 36.0, err=0.05),  # 0.90x, ERROR
            _row(8192, 1024, 1024, 100.0, 98.0, 97.0),  # 0.97x
            _row(2, 40960, 40960, nan, nan, nan, status="skipped", reason="estimated peak 50 GB"),
        ],
        "not_run": [[3, 1024, 1024]],
    }
    text = bs.render(results)
    lines = text.splitlines()
    assert lines[0] == "device: test"
    header = next(line for line in lines if line.startswith("| M |"))
    assert header == ("| M | K | N | bitfx µs | bf16 µs | bf16 Inductor µs | vs Inductor | vs eager | rel err | "
                      "kernel |")
    rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == 5  # the skipped shape has no row
    ratios = [float(r.split("|")[7].strip(" *x")) for r in rows]
    assert ratios == sorted(ratios) == [0.90, 0.97, 1.50, 2.20, 5.50]
    assert [int(r.split("|")[1]) for r in rows] == [512, 8192, 4096, 1, 1]
    assert "**0.90x**" in rows[0] and "ERROR" in rows[0]
    assert "ERROR" not in rows[1]
    assert "dp4a" in rows[4]
    vs_eager = float(rows[2].split("|")[8].strip(" x"))
    assert math.isclose(vs_eager, 1.60)
    summary = next(line for line in lines if line.startswith("Summary:"))
    assert "5 shapes measured (1 skipped, 0 failed, 1 not run" in summary
    assert "lowest vs Inductor 0.90x at M=512 K=2048 N=1024" in summary
    assert "; 2 below 1.0;" in summary
    assert "decode (M=1, K*N >= 2^24): lowest 5.50x at M=1 K=8192 N=8192" in summary
    assert "target >= 3x: met" in summary
    # M >= 128: 512 (0.90x), 8192 (0.97x), 4096 (1.50x)
    assert "M >= 128: lowest 0.90x at M=512 K=2048 N=1024, 2 of 3 below 1x (target >= 1x: NOT met)" in summary
    assert "1 with rel err > 0.02" in summary
    assert any(line.startswith("skipped: M=2 K=40960 N=40960") for line in lines)
    assert any(line.startswith("Slower than bf16 under Inductor:") and "M=8192 K=1024 N=1024" in line
               for line in lines)


def test_render_without_decode_or_slow_shapes():
    results = {"rows": [_row(64, 4096, 4096, 10.0, 30.0, 20.0), _row(1, 4096, 4096, 5.0, 20.0, 15.0)]}
    summary = bs.summary(results)
    assert summary.startswith("Summary: 2 shapes measured;")
    assert "; 0 below 1.0;" in summary
    assert "M >= 128: none measured" in summary
    assert "decode (M=1, K*N >= 2^24): lowest 3.00x" in summary and "target >= 3x: met" in summary
    results = {"rows": [_row(256, 4096, 4096, 10.0, 30.0, 20.0), _row(1, 4096, 4096, 8.0, 20.0, 20.0)]}
    summary = bs.summary(results)
    assert "M >= 128: lowest 2.00x at M=256 K=4096 N=4096, 0 of 1 below 1x (target >= 1x: met)" in summary
    assert "decode (M=1, K*N >= 2^24): lowest 2.50x" in summary and "NOT met" in summary
    assert "Slower than" not in bs.render(results)
    results = {"rows": [_row(64, 4096, 4096, 10.0, 30.0, 20.0)]}
    assert "decode (M=1, K*N >= 2^24): none measured" in bs.summary(results)


def test_main_without_cuda_exits_with_a_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bs.main(["--quick"])
    assert "needs a CUDA GPU" in str(exc.value)


def test_main_loop_budget_and_files(monkeypatch, tmp_path, capsys):
    """main's loop with the GPU parts replaced: one line per shape, the budget, both files."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (80 * 10**9, 80 * 10**9))
    calls = []

    def fake_measure(M, K, N, mem_limit):
        calls.append((M, K, N))
        assert mem_limit == bs.MEMORY_GUARD_BYTES
        return dict(_row(M, K, N, 10.0, 20.0, 9.0 if M == 16 else 30.0), seconds=0.1, compiles=0)

    monkeypatch.setattr(bs, "measure_shape", fake_measure)
    out = tmp_path / "o"
    assert bs.main(["--shapes", "1,4096,4096;16,1024,2048;64,2048,1024", "--out", str(out)]) == 0
    assert calls == [(1, 4096, 4096), (16, 1024, 2048), (64, 2048, 1024)]
    printed = capsys.readouterr().out
    assert "SLOWER than bf16 Inductor" in printed and "Summary: 3 shapes measured;" in printed
    saved = json.loads((out / "results.json").read_text())
    assert [r["M"] for r in saved["rows"]] == [1, 16, 64] and saved["not_run"] == []
    assert (out / "table.md").read_text().strip() == bs.render(saved).strip()

    calls.clear()  # a spent budget: nothing is started, everything is reported as not run
    assert bs.main(["--n", "4", "--budget-s", "-1", "--out", str(out)]) == 0
    assert calls == []
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["not_run"]) == 4 and saved["rows"] == []
