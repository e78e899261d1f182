"""What a compiled training step keeps for its backward: ``python -m bitfx.bench saved``.

A transformers Llama (a small shape on the CPU, ``--model`` on a GPU) in training mode is
compiled with Inductor alone and with the ``bitfx`` backend; after the compile, one more forward
runs under :func:`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor the
compiled graph saves for its backward (AOTAutograd's partitioner chose them). Parameters are
left out (both keep them anyway); each storage counts once. The table gives the bytes per dtype
and in all, and bitfx's total against Inductor's: the activation memory a step holds between
its forward and its backward, the part of peak memory that the ternary ops change.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from bitfx.bench import report
from bitfx.bench.model_shapes import MODELS, build_model, make_config


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, backend: str) -> Counter:
    """Bytes per dtype of the activations ``torch.compile(model, backend=backend)`` saves for backward."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    compiled(ids).logits.float().sum().backward()  # compiles
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = (str(t.dtype).replace("torch.", ""), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(ids).logits
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    counts: Counter = Counter()
    for dtype, nbytes in seen.values():
        counts[dtype] += nbytes
    return counts


def main(argv=None) -> int:
    p = report.parser("saved", __doc__)
    p.add_argument("--model", default="llama-1b", choices=list(MODELS),
                   help="the shape on a GPU (default llama-1b); the CPU runs its tiny config")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; CPU 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; CPU 64)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    batch, seq = args.batch or (4 if cuda else 2), args.seq or (2048 if cuda else 64)
    config = make_config(args.model, tiny=not cuda)
    model = build_model(config, device, dtype).train()
    for param in model.parameters():  # built for inference: trained here
        param.requires_grad_(True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    print(report.header(report.device_name(cuda), report.versions("triton", "transformers"),
                        report.command("saved", argv), f"{args.model}{'' if cuda else ' (tiny)'}, {batch}x{seq}, {dtype}"))
    rows = {backend: saved_bytes(model, ids, backend) for backend in ("inductor", "bitfx")}
    dtypes = sorted(set().union(*rows.values()))
    print("| backend | " + " | ".join(dtypes) + " | all (MB) | vs Inductor |")
    print("|---|" + "---|" * (len(dtypes) + 2))
    base = sum(rows["inductor"].values())
    for backend, counts in rows.items():
        total = sum(counts.values())
        cells = " | ".join(f"{counts.get(d, 0) / 1e6:.3f}" for d in dtypes)
        print(f"| {backend} | {cells} | {total / 1e6:.3f} | {total / base:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
