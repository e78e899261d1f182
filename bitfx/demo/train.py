"""``python -m bitfx``: train a small Llama-style language model as BitNet b1.58 with the
``bitfx`` backend, beside the same model trained in floating point, then convert, save,
reload and use it.

1. Text: the built-in corpus (:mod:`bitfx.demo.corpus`, a probabilistic grammar made by the package)
   or any text file (``--text``); characters are the tokens; 90% to train, 10% held out.
2. Training: the same initial weights, the same batches, the same steps: once through
   ``torch.compile(model, backend="bitfx")`` (ternary weights, int8 activations at every
   RMSNorm -> Linear site, straight-through gradients), once in floating point (bf16 autocast
   on a GPU, fp32 on the CPU). A progress bar, and the two loss curves in ``loss.png`` (with
   matplotlib, the ``plot`` extra).
3. Then: ``bitfx.quantize`` converts the ternary-trained model (packed 2-bit weights),
   ``bitfx.save`` writes it, ``bitfx.load`` reads it into a fresh skeleton (checked bit for bit
   against the converted model), and it generates a few lines.
4. It prints the sites, the held-out loss of the reloaded ternary model and of the float
   model, the sizes before and after, and tokens per second of generation.

Exit status 0 when the ternary model learned (its held-out loss fell to below 60% of where
it started) and the reloaded model matches the converted one; 1 otherwise; 2 for a bad
argument (a missing or binary ``--text``, ``--device cuda`` without a GPU, ``--steps 0``, ...),
checked before any work starts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bitfx
from bitfx.bench.timing import sync
from bitfx.demo.args import default_device, device as device_arg, positive_float, positive_int, read_text
from bitfx.demo.corpus import CharText, grammar_text
from bitfx.demo.example import ExampleConfig, ExampleLlama
from bitfx.demo.plot import NO_PLOT, plot_losses

# Model sizes: (dim, MLP hidden, heads, layers).
SIZES = {"tiny": (64, 176, 4, 2), "small": (128, 352, 4, 2), "base": (256, 704, 8, 4), "large": (512, 1408, 8, 8)}


def _progress(step: int, total: int, losses: dict[str, float], t0: float) -> None:
    """A progress bar redrawn in place on a terminal; a line every tenth of the way in a log."""
    tty = sys.stdout.isatty()
    if not tty and step not in (1, total) and step % max(1, total // 10):
        return
    width = 30
    done = round(width * step / total)
    rate = step / max(time.perf_counter() - t0, 1e-9)
    text = " ".join(f"{k} {v:.3f}" for k, v in losses.items())
    line = f"[{'#' * done}{'.' * (width - done)}] {step}/{total} ({rate:.1f} steps/s) loss: {text}"
    print(("\r" + line) if tty else line, end="\n" if step == total or not tty else "", flush=True)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine decay to a tenth of ``lr`` at ``steps``."""
    return lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def lm_loss(model, x, y, autocast: bool):
    """Next-token cross entropy of ``model`` on ids ``x`` against ``y`` (bf16 autocast when asked)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def held_out_loss(model, text: CharText, batch: int, seq: int, batches: int, autocast: bool) -> float:
    """Mean loss over ``batches`` held-out batches, the same windows on every call."""
    g = torch.Generator().manual_seed(1234)
    return sum(lm_loss(model, *text.batch(text.val, batch, seq, g), autocast).item() for _ in range(batches)) / batches


GEN_TOKENS = 60  # tokens generated per prompt at the end of the main job
GEN_ROUNDS = 3  # timed generation passes per model


@torch.no_grad()
def _generate(model, prompt: torch.Tensor, n: int, seq: int, g: torch.Generator, temperature: float = 0.7):
    ids = prompt.clone()
    for _ in range(n):
        logits = model(ids[None, -seq:])[0, -1].float()
        probs = torch.softmax(logits / temperature, -1).cpu()
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g).to(ids.device)])
    return ids


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _gguf_problem(path: str, dim: int, size: str) -> str:
    """Why ``--gguf PATH`` cannot be written for a model of width ``dim`` (empty when it can)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed: pip install gguf (or pip install -e '.[gguf]')"
    if dim % bitfx.gguf_export.GGUF_BLOCK:
        fits = sorted(k for k, v in SIZES.items() if v[0] % bitfx.gguf_export.GGUF_BLOCK == 0)
        return (f"--size {size} has width {dim}, and llama.cpp's ternary type stores rows in blocks of "
                f"{bitfx.gguf_export.GGUF_BLOCK} weights: use --size {' or '.join(fits)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name, e.g. {os.path.join(path, 'model.gguf')}"
    return ""


EPILOG = """\
subcommands:
  python -m bitfx [train] [options]   this training job (the default)
  python -m bitfx compiler [options]  the compiler on a built-in model: the sites bitfx.explain
                                      finds, compiled output against the eager reference, speed
                                      (python -m bitfx compiler --help)
  python -m bitfx finetune [options]  a float model fine-tuned into a ternary one
                                      (python -m bitfx finetune --help)
benchmarks: python -m bitfx.bench
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitfx", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=None, help="a UTF-8 text file to train on (default: the built-in grammar corpus)")
    p.add_argument("--size", default=None, choices=sorted(SIZES), help="default: small on the CPU, base on a GPU")
    p.add_argument("--steps", type=positive_int, default=None, help="default: 1000 on the CPU, 2000 on a GPU")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq", type=positive_int, default=64, help="characters per training window")
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--device", type=device_arg, default=default_device(), help="cpu, cuda or cuda:N "
                   "(default: cuda when torch finds a GPU)")
    p.add_argument("--out", default="bitfx-train", help="folder for loss.png and model.safetensors")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial weights and the batches")
    p.add_argument("--gguf", default=None, metavar="PATH",
                   help="also write the trained ternary model as a GGUF file for llama.cpp (needs --size base or "
                        "large: llama.cpp's ternary blocks hold 256 weights; pip install gguf)")
    return p


@contextlib.contextmanager
def deterministic():
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the block, restored after:
    Inductor then generates the embedding's backward with ATen's ordered ``index_put`` instead of
    atomic adds from parallel threads, so the compiled ternary run repeats bit for bit, as the
    eager float run does."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.text is not None:
        raw, source = read_text(p, args.text), args.text
    else:
        raw, source = grammar_text(), "the built-in grammar corpus"
    held_out = len(raw) - int(0.9 * len(raw))
    if held_out <= args.seq + 1:
        p.error(f"{source} is too short for --seq {args.seq}: its held-out last 10% has {held_out} characters, "
                f"more than {args.seq + 1} are needed")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out}: is a file, not a folder")
    device = args.device
    gpu = device.type == "cuda"
    dim, hidden, heads, layers = SIZES[args.size or ("base" if gpu else "small")]
    steps = args.steps if args.steps is not None else (2000 if gpu else 1000)
    if args.gguf:
        problem = _gguf_problem(args.gguf, dim, args.size or ("base" if gpu else "small"))
        if problem:
            print(f"bitfx: --gguf: {problem}", file=sys.stderr)
            return 1
    os.makedirs(args.out, exist_ok=True)

    text = CharText(raw, device)
    cfg = ExampleConfig(vocab=text.vocab, dim=dim, hidden=hidden, heads=heads, layers=layers)
    torch.manual_seed(args.seed)
    float_model = ExampleLlama(cfg).to(device)
    ternary_model = copy.deepcopy(float_model)  # the same initial weights
    n_params = sum(p.numel() for p in float_model.parameters())
    print(f"bitfx {bitfx.__version__}: training a {layers}-layer Llama-style model (dim {dim}, {n_params:,} parameters) "
          f"on {source} ({len(raw):,} characters, {text.vocab} distinct) for {steps} steps on {device}")

    batches = 8
    first_val = held_out_loss(float_model, text, args.batch, args.seq, batches, False)  # the starting point
    compiled = torch.compile(ternary_model, backend="bitfx")
    opts = {name: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.0)
            for name, m in (("ternary", ternary_model), ("float", float_model))}
    runners = {"ternary": compiled, "float": float_model}
    curves: dict[str, list[float]] = {"ternary": [], "float": []}
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    train_s = {"ternary": 0.0, "float": 0.0}
    with contextlib.nullcontext() if gpu else deterministic():  # the CPU run repeats bit for bit
        for step in range(1, steps + 1):
            x, y = text.batch(text.train, args.batch, args.seq, g)
            lr = lr_at(step, steps, args.lr, warmup=20)
            last = {}
            for name, model in runners.items():
                s0 = time.perf_counter()
                for group in opts[name].param_groups:
                    group["lr"] = lr
                loss = lm_loss(model, x, y, autocast=gpu and name == "float")
                opts[name].zero_grad(set_to_none=True)
                loss.backward()
                opts[name].step()
                last[name] = loss.item()
                curves[name].append(last[name])
                train_s[name] += time.perf_counter() - s0
            if step == 1 or step % max(1, steps // 100) == 0 or step == steps:
                _progress(step, steps, last, t0)
    plot_path = os.path.join(args.out, "loss.png")
    plotted = plot_losses(plot_path, {
        "ternary (bitfx backend)": curves["ternary"], "float" + (" (bf16)" if gpu else " (fp32)"): curves["float"]},
        title=f"Training loss, {layers}-layer model (dim {dim}) on {device}", ylabel="loss, nats per character (log scale)")

    # Convert, save, reload into a fresh skeleton that holds no float weight for the ternary layers.
    ternary_model.eval()
    float_model.eval()
    sample = text.batch(text.val, 1, args.seq, torch.Generator().manual_seed(0))[0]
    report = bitfx.explain(ternary_model, sample, config=bitfx.BitfxConfig(training=False))
    float_bytes = sum(p.numel() * p.element_size() for p in ternary_model.parameters())
    with torch.no_grad():
        bitfx.quantize(ternary_model, sample)
    path = os.path.join(args.out, "model.safetensors")
    bitfx.save(ternary_model, path)
    with torch.device("meta"):
        reloaded = ExampleLlama(cfg)
    bitfx.load(reloaded, path, device=device)
    with torch.no_grad():
        same = torch.equal(reloaded(sample), ternary_model(sample))
    ternary_bytes = sum(t.numel() * t.element_size() for t in reloaded.state_dict().values())

    val_ternary = held_out_loss(reloaded, text, args.batch, args.seq, batches, False)
    val_float = held_out_loss(float_model, text, args.batch, args.seq, batches, gpu)

    print(f"\n-- sites (bitfx.explain): {len(report.sites)} RMSNorm -> Linear sites, "
          f"{len(report.converted)} ternary linear layers")
    for s in report.sites:
        print(f"  {s.norm_module} -> {', '.join(m.rsplit('.', 1)[-1] for m in s.linear_modules)}")
    print(f"-- loss curves: {plot_path if plotted else NO_PLOT}")
    print(f"-- training time: ternary {train_s['ternary']:.1f} s (compile included), float {train_s['float']:.1f} s")
    print(f"-- held-out loss (nats per character): at the start {first_val:.3f}; ternary (converted, saved, reloaded) "
          f"{val_ternary:.3f}; float {val_float:.3f}")
    print(f"-- size: float weights {_bytes(float_bytes)}; converted model {_bytes(ternary_bytes)} "
          f"({ternary_model.bitfx_report.float_bytes / max(ternary_model.bitfx_report.quantized_bytes, 1):.1f}x "
          f"smaller in the ternary layers); checkpoint {path} {_bytes(os.path.getsize(path))}")
    print(f"-- reloaded from the checkpoint: {'bit-identical to' if same else 'DIFFERENT from'} the converted model")

    # The float model as a pretrained dense model, converted after training (no QAT): the error
    # falls with the number of ternary terms each weight is fitted with.
    print("-- the float-trained model converted after training with k ternary terms per weight (each term "
          "fitted greedily to the residual of the earlier ones; no training in ternary) and activation codes "
          "of a given width:")
    dense = dict(float_model.named_modules())
    for k, bits in ((1, 8), (2, 8), (3, 8), (3, 6), (3, 4)):
        with torch.no_grad():
            conv = bitfx.quantize(copy.deepcopy(float_model), sample, config=bitfx.BitfxConfig(terms=k, act_bits=bits))
            werr = [float((m.dequantize(torch.float32) - dense[n].weight.float()).norm() / dense[n].weight.float().norm())
                    for n, m in conv.named_modules() if isinstance(m, bitfx.BitfxLinear)]
        print(f"  k={k}, {bits}-bit activations: mean relative weight error {sum(werr) / len(werr):.3f}; held-out loss "
              f"{held_out_loss(conv, text, args.batch, args.seq, batches, False):.3f}")

    print("-- generated by the reloaded ternary model (prompt in [brackets]):")
    lines = [ln for ln in raw[int(0.9 * len(raw)):].splitlines() if len(ln) > 8][:3] or [raw[:8]]
    prompts = [text.encode(line[: max(4, len(line) // 3)]).to(device) for line in lines]
    # Both models generate from the same prompts, each once untimed first: the first calls at
    # each new length compile the ternary kernels (Triton) and warm cuBLAS and the allocator. Then
    # GEN_ROUNDS timed passes, the two models taking turns (a busy host slows both alike), and
    # the median pass of each.
    models = (("ternary", reloaded), ("float", float_model))
    for name, model in models:
        warm = torch.Generator().manual_seed(args.seed + 1)
        for prompt in prompts:
            _generate(model, prompt, GEN_TOKENS, args.seq, warm)
    passes = {name: [] for name, _ in models}
    for r in range(GEN_ROUNDS):
        for name, model in models:
            g = torch.Generator().manual_seed(args.seed + 2 + r)
            sync(gpu)
            t1 = time.perf_counter()
            outs = [_generate(model, prompt, GEN_TOKENS, args.seq, g) for prompt in prompts]
            sync(gpu)
            passes[name].append(GEN_TOKENS * len(prompts) / (time.perf_counter() - t1))
            if name == "ternary" and r == 0:
                for prompt, out in zip(prompts, outs):
                    cont = text.decode(out[len(prompt):].tolist()).split("\n")[0]
                    print(f"  [{text.decode(prompt.tolist())}]{cont}")
    speed = {name: statistics.median(v) for name, v in passes.items()}
    print(f"-- tokens/s (generation, one sequence, no KV cache, eager; median of {GEN_ROUNDS} passes taking turns, "
          f"after one untimed pass): ternary "
          f"{speed['ternary']:.1f}; float {speed['float']:.1f}" + ("" if gpu else "  (on the CPU the ternary ops run "
                                                                   "their plain-torch reference: a check, not a "
                                                                   "speed-up)"))
    if args.gguf:
        # Characters are the tokens; a generation in llama.cpp ends at a newline.
        bitfx.export_gguf(reloaded, args.gguf, vocab=text.chars, eos_token_id=text.index.get("\n"),
                          context_length=args.seq, name="bitfx char-level Llama")
        print(f"-- GGUF for llama.cpp (ternary layers in TQ2_0): {args.gguf} {_bytes(os.path.getsize(args.gguf))}")
    learned = val_ternary < 0.6 * first_val
    ok = learned and same
    print("OK" if ok else ("the ternary model did not learn" if not learned else "the reloaded model differs"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
