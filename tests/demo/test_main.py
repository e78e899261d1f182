"""The main job: ``python -m bitfx`` trains a ternary model to the end and prints every
figure; ``python -m bitfx compiler`` still shows the compiler."""

from __future__ import annotations

import struct
import zlib

from bitfx.__main__ import main
from bitfx.demo.corpus import grammar_text
from bitfx.demo.plot import write_curves_png


def test_train_job_runs_to_the_end(tmp_path, capsys):
    assert main(["--size", "tiny", "--steps", "150", "--batch", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for figure in ("RMSNorm -> Linear sites", "held-out loss", "ternary (converted, saved, reloaded)",
                   "size: float weights", "bit-identical to the converted model", "tokens/s", "loss curves",
                   "k=3, 8-bit activations: mean relative weight error", "k=3, 4-bit activations"):
        assert figure in out, figure
    assert out.rstrip().endswith("OK")
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_train_job_on_a_text_file(tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(grammar_text(3000, seed=7))
    main(["train", "--text", str(text), "--size", "tiny", "--steps", "5", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert f"on {text}" in out and "held-out loss" in out


def test_compiler_view_is_a_subcommand(capsys):
    assert main(["compiler", "--dim", "64", "--hidden", "96", "--reps", "1", "--seq", "8"]) == 0
    assert "torch.compile(model, backend='bitfx')" in capsys.readouterr().out


def test_loss_plot_png_is_well_formed(tmp_path):
    path = tmp_path / "p.png"
    legend = write_curves_png(str(path), {"a": [3.0, 2.0, 1.5], "b": [3.0, 2.5, float("nan"), 2.0]}, 64, 48)
    assert legend.startswith("blue: a; orange: b; x: steps 0..3, y: loss 1.50..3.00")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    (w, h) = struct.unpack(">II", data[16:24])
    assert (w, h) == (64, 48)
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w)
    assert raw.count(b"\x00\x00\x00") > 0  # the frame is drawn (black)


def test_grammar_corpus_is_reproducible():
    a, b = grammar_text(50, seed=3), grammar_text(50, seed=3)
    assert a == b and a != grammar_text(50, seed=4) and len(a.splitlines()) == 50
    assert "plus" in a and all(line.endswith(".") for line in a.splitlines())
