"""``python -m bitfx finetune``: fine-tune a float model into a BitNet b1.58 one with
:func:`bitfx.finetune` (the ``bitfx`` backend, optionally distilled from the frozen float model).

1. The float model: the main job's own (the same model, seed, batches and steps as the float
   run of ``python -m bitfx``, trained here first), or a transformers causal language model
   from a local checkpoint directory (``--from DIR``; its tokenizer encodes the text).
2. Its held-out loss, and that of the float model converted by ``bitfx.quantize`` alone.
3. Fine-tuning: ``--steps`` steps from the float weights, the held-out loss of the ternary
   model (the compiled model under ``torch.no_grad()``: the inference ops, the numbers of
   ``bitfx.quantize``) every ``--eval-every`` steps, and the first step at which it comes
   within 10% of the float model's. ``--scratch``: the same for ternary training from the
   float model's initial weights (the main job's ternary run), to compare the steps.
4. A progress bar, and the curves in ``finetune.png``.

Exit status 0 when fine-tuning lowered the held-out loss below that of the float model
converted without training; 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import bitfx
from bitfx.demo.corpus import CharText, grammar_text
from bitfx.demo.example import ExampleConfig, ExampleLlama
from bitfx.demo.plot import NO_PLOT, plot_losses
from bitfx.demo.train import SIZES, _progress, lm_loss, lr_at
from bitfx.finetune import _logits, finetune, load_float_model

WITHIN = 1.10  # "within 10%": held-out loss at most 1.1x the float model's


class TokenText(CharText):
    """Ids from a tokenizer, split and batched as :class:`CharText` does (90% train)."""

    def __init__(self, ids: list[int], device: torch.device):
        data = torch.tensor(ids, dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut].to(device), data[cut:].to(device)


@torch.no_grad()
def held_out(model, text: CharText, batch: int, seq: int, batches: int = 8) -> float:
    """Mean next-token loss over ``batches`` held-out windows, the same windows on every call."""
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(batches):
        x, y = text.batch(text.val, batch, seq, g)
        logits = _logits(model(x)).float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    return total / batches


def _batches(text: CharText, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield text.batch(text.train, batch, seq, g)


def _train_float(model, text, steps, batch, seq, lr, seed):
    """The main job's float run: its batches (one generator seeded by ``seed``), schedule, optimizer."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = text.batch(text.train, batch, seq, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=20)
        loss = lm_loss(model, x, y, False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, steps // 100) == 0 or step == steps:
            _progress(step, steps, {"float": loss.item()}, t0)


def _within(curve: dict[int, float], target: float):
    return next((step for step, v in sorted(curve.items()) if v <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="a local transformers checkpoint directory (default: the main job's float model, trained here)")
    p.add_argument("--text", default=None, help="a text file (default: the built-in grammar corpus)")
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="the main job's model size (default: as it)")
    p.add_argument("--float-steps", type=int, default=None, help="steps of the float run (default: as the main job)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="weight of the distillation term (default 0: cross entropy only, the faster of those measured)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate (peak; default: the main job's)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out evaluation interval (default: steps/20)")
    p.add_argument("--scratch", action="store_true", help="also train ternary from scratch, to compare the steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bitfx-train", help="folder for finetune.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "float_steps", "eval_every", "batch", "seq"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 <= args.alpha <= 1.0:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.source and args.size:
        p.error("--size picks the main job's model; a --from checkpoint brings its own")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    main_lr = 3e-3  # the main job's
    float_steps = args.float_steps or (2000 if gpu else 1000)
    every = args.eval_every or max(1, args.steps // 20)
    os.makedirs(args.out, exist_ok=True)

    if args.text:
        with open(args.text, encoding="utf-8") as f:
            raw = f.read()
        source = args.text
    else:
        raw, source = grammar_text(), "the built-in grammar corpus"
    init = None
    if args.source:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.source)
        except (OSError, ValueError) as e:
            print(f"bitfx: {args.source} has no tokenizer transformers can load ({e})", file=sys.stderr)
            return 1
        text = TokenText(tokenizer(raw)["input_ids"], device)
        float_model = load_float_model(args.source).to(device)
        what = f"{args.source} ({sum(q.numel() for q in float_model.parameters()):,} parameters)"
    else:
        text = CharText(raw, device)
        dim, hidden, heads, layers = SIZES[args.size or ("base" if gpu else "small")]
        cfg = ExampleConfig(vocab=text.vocab, dim=dim, hidden=hidden, heads=heads, layers=layers)
        torch.manual_seed(args.seed)
        float_model = ExampleLlama(cfg).to(device)
        init = copy.deepcopy(float_model)  # the from-scratch runs' initial weights
        what = f"the main job's {layers}-layer model (dim {dim})"
    if len(text.val) <= args.seq + 1:
        print(f"bitfx: {source} is too short for --seq {args.seq}", file=sys.stderr)
        return 1
    print(f"bitfx {bitfx.__version__}: fine-tuning {what} into ternary on {source}, {args.steps} steps, "
          f"alpha {args.alpha}, temperature {args.temperature}, on {device}")
    if init is not None:
        print(f"-- training the float model first ({float_steps} steps, as the main job's float run)")
        _train_float(float_model, text, float_steps, args.batch, args.seq, main_lr, args.seed)
    float_model.eval()
    val_float = held_out(float_model, text, args.batch, args.seq)
    target = WITHIN * val_float
    sample = text.batch(text.val, 1, args.seq, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        val_converted = held_out(bitfx.quantize(copy.deepcopy(float_model), sample), text, args.batch, args.seq)
    print(f"-- held-out loss: float {val_float:.3f} (within 10%: <= {target:.3f}); converted by bitfx.quantize "
          f"without training {val_converted:.3f}")

    def run(model, steps, lr, alpha, seed, label):
        curve: dict[int, float] = {}
        t0 = time.perf_counter()

        def on_step(step, stats, compiled):
            if step % every == 0 or step == steps:
                compiled.eval()
                curve[step] = held_out(compiled, text, args.batch, args.seq)
                compiled.train()
            if step == 1 or step % max(1, steps // 100) == 0 or step == steps:
                shown = {f"{label} (cross entropy)": stats["ce"]}
                if curve:
                    shown["held-out"] = curve[max(curve)]
                _progress(step, steps, shown, t0)

        result = finetune(model, _batches(text, args.batch, args.seq, seed), steps,
                          lr=lambda step: lr_at(step, steps, lr, warmup=min(20, max(1, steps // 10))),
                          alpha=alpha, temperature=args.temperature, callback=on_step)
        return result, curve

    student = copy.deepcopy(float_model).train()
    result, curve = run(student, args.steps, args.lr, args.alpha, args.seed + 1, "fine-tune")
    n = _within(curve, target)
    print(f"-- fine-tuned ternary model: held-out {curve[args.steps]:.3f} after {args.steps} steps; "
          + (f"within 10% of float after {n} steps" if n else f"not within 10% of float in {args.steps} steps"))

    curves = {"fine-tune, cross entropy": result.ce,
              "fine-tune, held-out": [curve.get(s, math.nan) for s in range(1, args.steps + 1)]}
    if args.scratch and init is not None:
        _, scratch = run(init.train(), float_steps, main_lr, 0.0, args.seed, "scratch")
        m = _within(scratch, target)
        print(f"-- ternary from scratch (the main job's ternary run): held-out {scratch[float_steps]:.3f} after "
              f"{float_steps} steps; " + (f"within 10% of float after {m} steps" if m else
                                         f"not within 10% of float in {float_steps} steps"))
        curves["from scratch, held-out"] = [scratch.get(s, math.nan) for s in range(1, float_steps + 1)]
    elif args.scratch:
        print("-- --scratch compares with the main job's model; a --from checkpoint has no from-scratch run here")
    longest = max(len(c) for c in curves.values())
    curves["float model, held-out"] = [val_float] * longest
    plot_path = os.path.join(args.out, "finetune.png")
    plotted = plot_losses(plot_path, curves, title="Fine-tuning a float model into ternary",
                          ylabel="loss, nats per character (log scale)")
    print(f"-- loss curves: {plot_path if plotted else NO_PLOT}")
    ok = curve[args.steps] < val_converted
    print("OK" if ok else "fine-tuning did not improve on the converted float model")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
