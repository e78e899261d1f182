"""Line plots as PNG files, drawn with matplotlib (the optional ``plot`` extra).

matplotlib is imported when a plot is drawn, not before. Without it nothing is drawn: the
functions return False and the caller prints :data:`NO_PLOT`. A figure is rendered by the Agg
canvas directly, so pyplot's global backend and figure list are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["NO_PLOT", "plot_lines", "plot_losses"]

NO_PLOT = "no plot: matplotlib is not installed (pip install 'bitfx[plot]' draws them)"


def plot_lines(path: str, lines: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
               ylabel: str, xlog: float | None = None, ylog: float | None = None, hline: float | None = None,
               marker: str | None = None) -> bool:
    """Draw ``lines`` (legend label -> (x values, y values)) into a PNG at ``path``, with axis
    labels, ticks, a legend and a title; ``xlog`` / ``ylog`` are log bases for the axes,
    ``hline`` a grey reference line. Returns False, drawing nothing, when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        ax.plot(list(xs), list(ys), label=label, lw=1.2, marker=marker)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8)
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 4 rather than 2x10^0 on a short log axis
    if xlog:
        ax.set_xscale("log", base=xlog)
        ax.xaxis.set_major_formatter(plain)
    if ylog:
        ax.set_yscale("log", base=ylog)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", color="0.9", lw=0.6)
    ax.legend(loc="upper right")  # both kinds of curve here fall to the right; "best" is slow on long curves
    fig.savefig(path, dpi=120)
    return True


def plot_losses(path: str, curves: dict[str, Sequence[float]], *, title: str,
                ylabel: str = "training loss (log scale)") -> bool:
    """Loss curves (label -> the loss at steps 1, 2, ...; NaN where a step has none, e.g. a
    held-out loss measured every few steps) on a log-scaled loss axis, each curve joining the
    steps it has; returns False, drawing nothing, when matplotlib is missing."""
    lines = {}
    for label, ys in curves.items():
        steps = [i for i, y in enumerate(ys, 1) if math.isfinite(y)]
        lines[label] = (steps, [ys[i - 1] for i in steps])
    return plot_lines(path, lines, title=title, xlabel="training step", ylabel=ylabel, ylog=10)
