"""The main job: ``python -m bitfx`` trains a ternary model to the end and prints every
figure; ``python -m bitfx compiler`` still shows the compiler."""

from __future__ import annotations

from bitfx.__main__ import main
from bitfx.demo.corpus import grammar_text
from bitfx.demo.plot import NO_PLOT


def test_train_job_runs_to_the_end(tmp_path, capsys):
    assert main(["--size", "tiny", "--steps", "150", "--batch", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for figure in ("RMSNorm -> Linear sites", "held-out loss", "ternary (converted, saved, reloaded)",
                   "size: float weights", "bit-identical to the converted model", "tokens/s", "loss curves",
                   "k=3, 8-bit activations: mean relative weight error", "k=3, 4-bit activations"):
        assert figure in out, figure
    assert out.rstrip().endswith("OK")
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    png = (tmp_path / "loss.png").read_bytes()  # matplotlib is in the test extra
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert f"loss curves: {tmp_path / 'loss.png'}" in out


def test_train_job_on_a_text_file_without_matplotlib(tmp_path, capsys, no_matplotlib):
    text = tmp_path / "story.txt"
    text.write_text(grammar_text(3000, seed=7))
    main(["train", "--text", str(text), "--size", "tiny", "--steps", "5", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert f"on {text}" in out and "held-out loss" in out
    assert f"loss curves: {NO_PLOT}" in out and "pip install 'bitfx[plot]'" in out
    assert not (tmp_path / "o" / "loss.png").exists() and (tmp_path / "o" / "model.safetensors").exists()


def test_compiler_view_is_a_subcommand(capsys):
    assert main(["compiler", "--dim", "64", "--hidden", "96", "--reps", "1", "--seq", "8"]) == 0
    assert "torch.compile(model, backend='bitfx')" in capsys.readouterr().out


def test_grammar_corpus_is_reproducible():
    a, b = grammar_text(50, seed=3), grammar_text(50, seed=3)
    assert a == b and a != grammar_text(50, seed=4) and len(a.splitlines()) == 50
    assert "plus" in a and all(line.endswith(".") for line in a.splitlines())
