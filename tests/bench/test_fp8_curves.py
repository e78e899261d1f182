"""The FP8 convergence benchmark's pieces (``python -m bitfx.bench fp8``), on the CPU (the
comparison itself runs on a GPU)."""

from __future__ import annotations

from bitfx.bench import fp8 as fp8


def test_smooth_is_a_running_mean():
    assert fp8.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert fp8.smooth([2.0], 5) == [2.0]


def test_stdlib_corpus_is_real_text_of_the_asked_length():
    text, source = fp8.stdlib_text(20_000)
    assert len(text) == 20_000 and "standard library" in source
    assert "def " in text and "import " in text  # Python modules, read from this installation


def test_render_puts_the_two_runs_side_by_side():
    losses_e = [4.0 - 0.01 * i for i in range(100)]
    losses_f = [x + 0.05 for x in losses_e]
    results = {
        "header": "h",
        "settings": {"window": 1},
        "runs": {
            "exact": {"losses": losses_e, "held_out": [(50, 3.5), (100, 3.0)], "step_ms": 10.0},
            "fp8": {"losses": losses_f, "held_out": [(50, 3.6), (100, 3.1)], "step_ms": 8.0},
        },
    }
    table = fp8.render(results)
    rows = {int(r.split("|")[1]): [c.strip() for c in r.strip("|").split("|")]
            for r in table.splitlines() if r.startswith("| ") and r.split("|")[1].strip().isdigit()}
    assert rows[100][1:4] == ["3.0100", "3.0600", "+0.0500"]  # step 100: the last losses and their gap
    assert rows[50][4:7] == ["3.5000", "3.6000", "+0.1000"]  # held-out where both were evaluated
    assert "exact 10.0 ms, fp8 8.0 ms" in table
