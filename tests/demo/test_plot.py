"""Plots: a PNG with axes, labels and a legend where matplotlib is installed; without it,
nothing drawn and a line saying how to get it."""

from __future__ import annotations

import struct

import pytest

from bitfx.demo.plot import NO_PLOT, plot_lines, plot_losses

CURVES = {"ternary (bitfx backend)": [3.4, 2.9, 2.1, 1.6, float("nan"), 1.3],
          "float (fp32)": [3.4, 2.7, 1.9, 1.4, 1.2, 1.1]}


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_loss_plot_is_a_png_with_axes_and_legend(tmp_path):
    pytest.importorskip("matplotlib")  # the test extra installs it
    from matplotlib.image import imread

    path = tmp_path / "loss.png"
    assert plot_losses(str(path), CURVES, title="Training loss")
    w, h = _png_size(path)
    assert (w, h) == (900, 540)  # 7.5 x 4.5 inches at 120 dpi
    pixels = imread(str(path))
    assert pixels.shape[:2] == (h, w)
    assert pixels.std() > 0.05  # something is drawn on the white canvas


def test_loss_plot_has_a_log_loss_axis_labelled_curves_and_a_title(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), savefig(self, *a, **k)))
    plot_losses(str(tmp_path / "loss.png"), CURVES, title="Training loss", ylabel="loss (log scale)")
    (ax,) = figures[0].axes
    assert ax.get_yscale() == "log" and ax.get_xscale() == "linear"
    assert ax.get_title() == "Training loss"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "loss (log scale)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(CURVES)
    assert list(ax.lines[1].get_xdata()) == [1, 2, 3, 4, 5, 6]  # steps count from 1
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3, 4, 6]  # a step without a value is joined over


def test_speedup_plot_with_a_log2_axis(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    assert plot_lines(str(path), {"K=2048, N=2048": ([1, 16, 256], [4.0, 2.0, 1.2])}, title="t", xlabel="M",
                      ylabel="speed-up", xlog=2, hline=1.0, marker="o")
    _png_size(path)


def test_without_matplotlib_nothing_is_drawn(tmp_path, no_matplotlib):
    path = tmp_path / "loss.png"
    assert plot_losses(str(path), CURVES, title="Training loss") is False
    assert not path.exists()
    assert "pip install 'bitfx[plot]'" in NO_PLOT
