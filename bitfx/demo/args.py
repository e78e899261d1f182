"""Checked command-line arguments of the main job: bad values stop the parser with one line
naming the problem (exit status 2) before any work starts."""

from __future__ import annotations

import argparse
import os

import torch

__all__ = ["positive_int", "positive_float", "device", "default_device", "read_text"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, present on this machine."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the ternary ops run on cpu or cuda only")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
                   else "torch finds no CUDA GPU")
            raise argparse.ArgumentTypeError(f"{text}: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_text(parser: argparse.ArgumentParser, path: str) -> str:
    """The contents of the text file at ``path`` (UTF-8); a missing file, a directory or binary
    data end the program through ``parser.error``."""
    if not os.path.exists(path):
        parser.error(f"--text {path}: no such file")
    if os.path.isdir(path):
        parser.error(f"--text {path}: is a directory, not a text file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        parser.error(f"--text {path}: cannot be read ({e.strerror})")
    if b"\x00" in data:
        parser.error(f"--text {path}: is binary data (it holds NUL bytes), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        parser.error(f"--text {path}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # line ends as open() in text mode reads them
