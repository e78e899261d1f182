"""What every benchmark writes: the header line (device, versions, command), the command-line
parser of a subcommand, figures and ratios as table cells, and the result files."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Iterable, Optional

import torch


def parser(sub: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of ``python -m bitfx.bench <sub>``, described by ``doc``'s first line."""
    return argparse.ArgumentParser(prog=f"python -m bitfx.bench {sub}", description=doc.strip().split("\n")[0])


def command(sub: str, argv: Optional[Iterable[str]] = None) -> str:
    """The command line of a run, as a header records it."""
    args = list(sys.argv[1:] if argv is None else argv)
    return f"python -m bitfx.bench {sub}" + ("" if not args else " " + " ".join(args))


def version(package: str) -> Optional[str]:
    """``package.__version__``, or None where it is not importable."""
    try:
        module = __import__(package)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def versions(*packages: str) -> dict[str, Optional[str]]:
    """torch's version and each of ``packages``' (None where not importable), and Python's."""
    out: dict[str, Optional[str]] = {"torch": torch.__version__}
    out.update({p: version(p) for p in packages})
    out["python"] = sys.version.split()[0]
    return out


def need_cuda(sub: str, device: str = "cuda", smoke: bool = False) -> bool:
    """Whether ``python -m bitfx.bench <sub>`` runs on CUDA (``device == "cuda"``); exits with a
    message where it asks for CUDA and none is there (``smoke``: the subcommand also has a
    ``--device cpu`` smoke run, which the message offers)."""
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"python -m bitfx.bench {sub} needs a CUDA GPU" + (" (or --device cpu for a tiny smoke run)" if smoke else ""))
    return cuda


def device_name(cuda: bool = True) -> str:
    return torch.cuda.get_device_name() if cuda else "cpu"


def header(device: str, packages: dict[str, Any], cmd: str, *extra: str) -> str:
    """``device: D; torch V; triton V; ...; command: C`` and any ``extra`` parts, one line."""
    parts = [f"device: {device}"] + [f"{k} {v}" for k, v in packages.items() if k != "python"]
    return "; ".join(parts + [f"command: {cmd}", *extra])


def fmt(x: Optional[float], spec: str, missing: str = "—") -> str:
    """``x`` formatted by ``spec``; ``missing`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, spec)


def ratio(num: Optional[float], den: Optional[float]) -> float:
    """``num / den``, NaN where either is missing (None, NaN) or ``den`` is 0."""
    if num is None or den is None or not den or math.isnan(num) or math.isnan(den):
        return float("nan")
    return num / den


def times(num: Optional[float], den: Optional[float], missing: str = "—") -> str:
    """``num / den`` as ``1.85x``; ``missing`` where either is missing or zero."""
    r = ratio(num, den)
    return missing if math.isnan(r) or not num else f"{r:.2f}x"


def md_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_head(names: Iterable[str], align: str = "---") -> list[str]:
    """A Markdown table's header row and its rule (``align`` per column, e.g. ``"---:"``)."""
    names = list(names)
    return [md_row(names), "|" + "|".join(align for _ in names) + "|"]


def write_json(path: str, obj: Any, indent: Optional[int] = 1, default=None) -> None:
    """``obj`` as JSON at ``path`` (``default``: json.dump's, for objects it cannot write)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent, default=default)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def write_results(out: str, results: dict, table: str, table_name: str = "table.md",
                  indent: Optional[int] = 1) -> None:
    """``results.json`` and the Markdown ``table_name`` in the folder ``out`` (made if missing)."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), results, indent)
    write_text(os.path.join(out, table_name), table)
