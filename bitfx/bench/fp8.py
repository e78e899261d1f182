"""Convergence of the FP8 backward: ``python -m bitfx.bench fp8``.

The same ternary model (every linear ternary, the ``bitfx`` backend) is trained twice from the
same initial weights on the same batches: once with the exact straight-through backward
(``BitfxConfig(backward="exact")``, the default) and once with the FP8 backward
(``backward="fp8"``). The loss curves side by side, and the held-out loss at intervals, say
whether the FP8 gradients change training. The model is the main job's
(:class:`bitfx.demo.example.ExampleLlama`), trained by its loss and schedule
(:mod:`bitfx.demo.train`).

Corpus: by default real text every Python installation carries and no download needs: the
Python standard library's own modules (``*.py`` directly in ``sysconfig``'s ``stdlib`` folder,
sorted by name, concatenated), as characters (tokens are the distinct characters). ``--text FILE``
trains on any text file instead. The last 10% is held out.

Writes ``results.json`` (both curves, the held-out losses, the settings), ``table.md`` and
``loss.png`` (the two curves, smoothed) to ``--out`` (default ``bench_out/fp8``).
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import sysconfig

import torch

from bitfx.bench import report
from bitfx.bench.timing import timed

SIZES = {"small": (128, 352, 4, 4), "base": (512, 1408, 8, 8)}  # dim, hidden, layers, heads


def stdlib_text(limit: int) -> tuple[str, str]:
    """The standard library's top-level modules as one text (at most ``limit`` characters), and
    where it came from."""
    folder = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            s = f.read()
        parts.append(s)
        total += len(s)
        if total >= limit:
            break
    if not parts:
        raise SystemExit(f"python -m bitfx.bench fp8: no *.py files in {folder}; pass --text FILE")
    return "\n".join(parts)[:limit], f"the Python standard library's modules in {folder}"


def smooth(xs: list[float], window: int) -> list[float]:
    """Running mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def train(mode: str, text, args, device: torch.device) -> dict:
    """One run: ``steps`` AdamW steps through ``torch.compile(backend="bitfx")`` with ``mode``."""
    import bitfx
    from bitfx.demo.example import ExampleConfig, ExampleLlama
    from bitfx.demo.train import held_out_loss, lm_loss, lr_at

    dim, hidden, layers, heads = SIZES[args.size]
    torch.manual_seed(args.seed)
    model = ExampleLlama(ExampleConfig(vocab=text.vocab, dim=dim, hidden=hidden, layers=layers, heads=heads)).to(device).train()
    compiled = torch.compile(model, backend="bitfx", options={"config": bitfx.BitfxConfig(backward=mode)})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    losses, held, times = [], [], []
    for step in range(1, args.steps + 1):
        x, y = text.batch(text.train, args.batch, args.seq, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=50)

        def one_step() -> float:
            loss = lm_loss(compiled, x, y, autocast=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()  # synchronizes: the step's time is whole

        loss, _, seconds = timed(one_step, cuda=False)
        losses.append(loss)
        times.append(seconds)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            held.append((step, held_out_loss(compiled, text, args.batch, args.seq, 4, False)))
            model.train()
        if step % max(1, args.steps // 10) == 0:
            print(f"  {mode}: step {step}/{args.steps} loss {statistics.mean(losses[-50:]):.4f}"
                  + (f", held-out {held[-1][1]:.4f}" if held and held[-1][0] == step else ""), flush=True)
    torch._dynamo.reset()
    return {"losses": losses, "held_out": held, "step_ms": statistics.median(times[10:] or times) * 1e3}


def render(results: dict) -> str:
    runs = results["runs"]
    window = results["settings"]["window"]
    ex, f8 = smooth(runs["exact"]["losses"], window), smooth(runs["fp8"]["losses"], window)
    n = len(ex)
    lines = [results["header"], "",
             f"| step | train loss, exact (mean of last {window}) | train loss, fp8 | fp8 − exact | "
             "held-out, exact | held-out, fp8 | fp8 − exact |", "|---|---|---|---|---|---|---|"]
    held = {s: v for s, v in runs["exact"]["held_out"]}
    held8 = {s: v for s, v in runs["fp8"]["held_out"]}
    for step in sorted(set(held) | {max(1, round(n * k / 10)) for k in range(1, 11)}):
        if step > n:
            continue
        h, h8 = held.get(step), held8.get(step)
        hcells = f"{h:.4f} | {h8:.4f} | {h8 - h:+.4f}" if h is not None and h8 is not None else "— | — | —"
        lines.append(f"| {step} | {ex[step - 1]:.4f} | {f8[step - 1]:.4f} | {f8[step - 1] - ex[step - 1]:+.4f} | {hcells} |")
    lines += ["", f"median step: exact {runs['exact']['step_ms']:.1f} ms, fp8 {runs['fp8']['step_ms']:.1f} ms "
              "(a small model: information, not the speed benchmark)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = report.parser("fp8", __doc__)
    p.add_argument("--text", default=None, help="a text file (default: the Python standard library's modules)")
    p.add_argument("--chars", type=int, default=4_000_000, help="at most this many characters of the corpus")
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="default: base on a GPU, small on the CPU")
    p.add_argument("--steps", type=int, default=None, help="default: 2000 on a GPU, 60 on the CPU")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join("bench_out", "fp8"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.size = args.size or ("base" if gpu else "small")
    args.steps = args.steps or (2000 if gpu else 60)
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    if not gpu:
        args.seq = min(args.seq, 64)
        args.batch = min(args.batch, 8)
    import bitfx
    from bitfx.demo.corpus import CharText
    from bitfx.demo.plot import NO_PLOT, plot_losses

    if args.text:
        with open(args.text, encoding="utf-8", errors="replace") as f:
            raw, source = f.read()[: args.chars], args.text
    else:
        raw, source = stdlib_text(args.chars)
    text = CharText(raw, device)
    device_name = torch.cuda.get_device_name(device) if gpu else "cpu"
    header = report.header(device_name, {"torch": torch.__version__, "bitfx": bitfx.__version__},
                           report.command("fp8", argv), f"corpus: {source} ({len(raw):,} characters, {text.vocab} distinct)",
                           f"model: ExampleLlama {args.size} {SIZES[args.size]}, fp32 parameters, every linear ternary",
                           f"{args.steps} steps of {args.batch}x{args.seq}")
    print(header, flush=True)
    results = {"header": header, "settings": {**vars(args), "window": max(1, args.steps // 40)}, "runs": {}}
    for mode in ("exact", "fp8"):
        results["runs"][mode] = train(mode, text, args, device)
    os.makedirs(args.out, exist_ok=True)
    w = results["settings"]["window"]
    if not plot_losses(os.path.join(args.out, "loss.png"), {
            "exact straight-through backward": smooth(results["runs"]["exact"]["losses"], w),
            "FP8 backward": smooth(results["runs"]["fp8"]["losses"], w)},
            title=f"Ternary training, exact against FP8 backward ({args.size} model, {device_name})",
            ylabel=f"training loss, running mean of {w} steps (log scale)"):
        print(NO_PLOT, flush=True)
    table = render(results)
    report.write_results(args.out, results, table, indent=None)
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
