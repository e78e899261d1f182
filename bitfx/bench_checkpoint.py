"""Peak host memory of :func:`bitfx.load` at a real model's shape, against the float model's size.

``python -m bitfx.bench_checkpoint`` builds a Llama of the given shape (default: Llama-3.2-1B's)
with random bf16 weights, converts it with :func:`bitfx.quantize`, saves it, then, in a fresh
process, builds the model's skeleton on the meta device, loads the checkpoint and reports the
peak resident memory that loading added, next to the float model's size and the file's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch


def _config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=True, use_cache=False,
    )


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _load_child(args)
        return

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
        out = subprocess.run([sys.executable, "-m", "bitfx.bench_checkpoint", "--child", f"--path={path}", *flags],
                             check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    mib = 2**20
    print(f"shape: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{r['ternary_layers']} ternary linear layers")
    print(f"float model (bf16): {float_bytes / mib:.0f} MiB; checkpoint file: {file_bytes / mib:.0f} MiB")
    print(f"peak resident memory added by bitfx.load into a meta skeleton: "
          f"{r['peak_after_mib'] - r['peak_before_mib']:.0f} MiB (resident before {r['peak_before_mib']:.0f} MiB, "
          f"peak during the load {r['peak_after_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
