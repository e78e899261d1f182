"""``python -m bitfx``: the main job (:mod:`bitfx.demo`): ``python -m bitfx [train] [options]``
trains, converts, saves, reloads and generates; ``python -m bitfx compiler [options]`` shows the
compiler at work; ``python -m bitfx finetune [options]`` fine-tunes a float model into a ternary
one. The benchmarks are ``python -m bitfx.bench``."""

from __future__ import annotations

import sys

from bitfx.demo import main

if __name__ == "__main__":
    sys.exit(main())
