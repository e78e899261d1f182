"""Peak host memory of :func:`bitfx.load` at a real model's shape, against the float model's size.

``python -m bitfx.bench checkpoint`` builds a Llama of the given shape (default: Llama-3.2-1B's,
from :mod:`bitfx.bench.model_shapes`) with random bf16 weights, converts it with
:func:`bitfx.quantize`, saves it, then, in a fresh process, builds the model's skeleton on the
meta device, loads the checkpoint and reports the peak resident memory that loading added,
next to the float model's size and the file's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from bitfx.bench import report
from bitfx.bench.model_shapes import MODELS, make_config

_FLAGS = {  # flag -> the config field it sets (defaults: Llama-3.2-1B)
    "hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
    "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size",
}


def _config(args):
    """``llama-1b``'s config with the shape of the flags (head size: hidden / heads)."""
    fields = {field: getattr(args, flag) for flag, field in _FLAGS.items()}
    return make_config("llama-1b", head_dim=args.hidden // args.heads, use_cache=False, **fields)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh: a process started from a large one inherits its peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _load_child(args) -> None:
    from transformers import LlamaForCausalLM

    import bitfx

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(_config(args)).to(torch.bfloat16)
    _reset_peak()
    before = _status_mib("VmRSS")
    bitfx.load(skeleton, args.path)
    after = _status_mib("VmHWM")
    ternary = sum(isinstance(m, bitfx.BitfxLinear) for m in skeleton.modules())
    print(json.dumps({"peak_before_mib": before, "peak_after_mib": after, "ternary_layers": ternary}))


def main(argv=None) -> int:
    p = report.parser("checkpoint", __doc__)
    defaults = MODELS["llama-1b"][1]
    for flag, field in _FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=defaults[field])
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _load_child(args)
        return 0

    from transformers import LlamaForCausalLM

    import bitfx

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(args)).to(torch.bfloat16).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied ones once
    with torch.no_grad():
        bitfx.quantize(model, torch.arange(8).unsqueeze(0))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        bitfx.save(model, path)
        file_bytes = os.path.getsize(path)
        del model
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("path", "child")]
        out = subprocess.run([sys.executable, "-m", "bitfx.bench", "checkpoint", "--child", f"--path={path}", *flags],
                             check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    print(f"shape: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{r['ternary_layers']} ternary linear layers")
    print(f"float model (bf16): {float_bytes / mib:.0f} MiB; checkpoint file: {file_bytes / mib:.0f} MiB")
    print(f"peak resident memory added by bitfx.load into a meta skeleton: "
          f"{r['peak_after_mib'] - r['peak_before_mib']:.0f} MiB (resident before {r['peak_before_mib']:.0f} MiB, "
          f"peak during the load {r['peak_after_mib']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
