"""The main job's command line: a bad argument stops it before any work starts, with exit
status 2 and one line naming the problem; ``--help`` names the ``compiler`` subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitfx.__main__ import main


def _refused(argv, capsys) -> str:
    """Run the job with ``argv``; assert it exits with status 2 and return its error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def out(tmp_path):
    """The job's output folder; a refused job never creates it."""
    path = tmp_path / "out"
    yield str(path)
    assert not path.exists()


@pytest.mark.parametrize("steps", ["0", "-1", "ten"])
def test_steps_must_be_a_positive_integer(steps, out, capsys):
    line = _refused(["--steps", steps, "--out", out], capsys)
    assert "argument --steps" in line and steps in line


@pytest.mark.parametrize("flag", ["--batch", "--seq", "--lr"])
def test_sizes_must_be_positive(flag, out, capsys):
    assert f"argument {flag}" in _refused([flag, "0", "--out", out], capsys)


def test_missing_text_file(tmp_path, out, capsys):
    missing = tmp_path / "nowhere.txt"
    assert f"--text {missing}: no such file" in _refused(["--text", str(missing), "--out", out], capsys)


def test_text_that_is_a_directory(tmp_path, out, capsys):
    assert "is a directory" in _refused(["--text", str(tmp_path), "--out", out], capsys)


@pytest.mark.parametrize("data, why", [(b"PK\x03\x04\x00\x00binary", "binary data"),
                                        (b"caf\xe9 au lait\n" * 40, "not UTF-8 text (byte 0xe9 at offset 3)")])
def test_text_that_is_not_text(tmp_path, out, capsys, data, why):
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    assert why in _refused(["--text", str(path), "--out", out], capsys)


def test_text_too_short_for_the_window(tmp_path, out, capsys):
    path = tmp_path / "short.txt"
    path.write_text("a few words\n")
    assert "too short for --seq 64" in _refused(["--text", str(path), "--out", out], capsys)


def test_cuda_without_a_gpu(monkeypatch, out, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(["--device", "cuda", "--out", out], capsys)
    assert "argument --device: cuda:" in line and "use --device cpu" in line


@pytest.mark.parametrize("device", ["gpu0", "meta"])
def test_devices_the_job_cannot_use(device, out, capsys):
    assert f"argument --device: '{device}'" in _refused(["--device", device, "--out", out], capsys)


def test_compiler_subcommand_checks_its_arguments_too(capsys):
    assert "argument --reps" in _refused(["compiler", "--reps", "0"], capsys)
    assert "--dim 12: must be a multiple" in _refused(["compiler", "--dim", "12"], capsys)


def test_help_names_the_compiler_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "python -m bitfx compiler" in help_text and "python -m bitfx finetune" in help_text
    assert "--steps" in help_text


def test_from_the_shell_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bitfx", "--steps", "0", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "python -m bitfx: error: argument --steps: must be a positive integer, got 0"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
