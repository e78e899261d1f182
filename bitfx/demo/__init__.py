"""The main job, ``python -m bitfx``: an application of the library, not part of it.

* ``python -m bitfx [train] [options]`` (the default): train a small Llama-style language model as
  BitNet b1.58 with the ``bitfx`` backend beside the same model in floating point, then convert,
  save, reload and generate with it (:mod:`bitfx.demo.train`).
* ``python -m bitfx compiler [options]``: the compiler at work on a built-in model: the sites,
  the compiled output against the eager reference, the speed (:mod:`bitfx.demo.compiler`).
* ``python -m bitfx finetune [options]``: fine-tune a float model (the main job's, or a local
  transformers checkpoint) into a ternary one with :func:`bitfx.finetune` (:mod:`bitfx.demo.finetune`).

Pieces: the built-in model (:mod:`bitfx.demo.example`), the built-in corpus and characters as
tokens (:mod:`bitfx.demo.corpus`), the loss plot (:mod:`bitfx.demo.plot`). ``import bitfx`` does
not import this package.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Run ``compiler`` or ``finetune`` when it is the first argument, else the training job
    (``train`` optional)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compiler":
        from bitfx.demo.compiler import main as run

        return run(argv[1:])
    if argv and argv[0] == "finetune":
        from bitfx.demo.finetune import main as run

        return run(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from bitfx.demo.train import main as run

    return run(argv)
