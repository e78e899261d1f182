"""``python -m bitfx.bench <subcommand> [options]``: one command for every benchmark.

Each subcommand hands the rest of the line to its module's ``main(argv)``; ``python -m
bitfx.bench <subcommand> --help`` lists its options. The form of earlier releases,
``python -m bitfx.bench --models [LIST] [options]``, still runs ``models``.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "sites": "RMSNorm -> Linear sites against bf16 (eager, Inductor, _int_mm); the M sweep and its plot",
    "models": "whole transformers models: decode step, kernels, generate(); and the site table",
    "shapes": "random (M, K, N) site shapes against bf16 under Inductor",
    "host": "host time per op outside CUDA graphs",
    "eager": "the main job's model eagerly: forward time, tokens/s and kernels, float and each ternary form",
    "launch": "a default-mode decode step per launch choice against bf16, interleaved in one process",
    "front": "the one-kernel decode linear with and without its register bound",
    "train": "a whole-model training step (350M, 1B shapes) against bf16 Inductor (--fsdp under torchrun)",
    "fp8": "loss curves: the exact straight-through backward against the FP8 one",
    "checkpoint": "peak host memory of bitfx.load at a real model's shape",
    "saved": "the activations a compiled training step keeps for backward, bitfx against Inductor",
    "tune": "sweep the ternary matmul's (and norm_quant's) launch configurations",
    "sass": "registers, spills and instructions of the decode kernels, compiled for a GPU without one",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: python -m bitfx.bench <subcommand> [options]   (<subcommand> --help: its options)",
             "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and "--models" in argv:  # the old `bitfx.bench --models [LIST]`
        i = argv.index("--models")
        argv = ["models"] + argv[:i] + argv[i + 1:]
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"\nunknown subcommand {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bitfx.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
