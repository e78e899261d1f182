"""``import bitfx``: light (no transformers), with ``bitfx.hf_bitnet`` reachable as an attribute."""

from __future__ import annotations

import subprocess
import sys


def test_hf_bitnet_is_an_attribute_and_transformers_is_not_loaded():
    code = ("import sys, bitfx\n"
            "assert callable(bitfx.hf_bitnet.convert_transformers_bitnet)\n"
            "assert bitfx.hf_bitnet is sys.modules['bitfx.hf_bitnet']\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate'))\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
