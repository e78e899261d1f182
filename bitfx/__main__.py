"""``python -m bitfx``: the main job.

* ``python -m bitfx [train] [options]`` (the default): train a small Llama-style language model as
  BitNet b1.58 with the ``bitfx`` backend beside the same model in floating point, then convert,
  save, reload and generate with it (:mod:`bitfx.train`).
* ``python -m bitfx compiler [options]``: the compiler at work on a built-in model: the sites,
  the compiled output against the eager reference, the speed (:mod:`bitfx.compiler_demo`).
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compiler":
        from bitfx.compiler_demo import main as run

        return run(argv[1:])
    if argv and argv[0] == "train":
        argv = argv[1:]
    from bitfx.train import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
