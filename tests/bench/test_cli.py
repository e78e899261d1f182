"""``python -m bitfx.bench``: one command, a subcommand per benchmark, each with its ``--help``;
and the library imports neither the benchmarks nor the main job."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from bitfx.bench.__main__ import SUBCOMMANDS, main


def test_without_a_subcommand_lists_them_and_fails():
    proc = subprocess.run([sys.executable, "-m", "bitfx.bench"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "usage: python -m bitfx.bench <subcommand>" in proc.stderr
    listed = [line.split()[0] for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS) == ["sites", "models", "shapes", "host", "eager", "launch", "front", "train", "fp8", "checkpoint", "saved", "tune", "sass"]


def test_help_and_unknown_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in SUBCOMMANDS)
    assert main(["bench_models"]) == 2
    assert "unknown subcommand 'bench_models'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_each_subcommand_has_a_module_and_a_help(name, capsys):
    module = importlib.import_module(f"bitfx.bench.{name}")
    assert module.__doc__ and f"python -m bitfx.bench {name}" in module.__doc__
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m bitfx.bench {name} ")


def test_the_library_imports_neither_bench_nor_demo():
    code = ("import sys, bitfx; apps = sorted(m for m in sys.modules if m.startswith(('bitfx.bench', 'bitfx.demo')));"
            "print(apps); assert not apps")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
