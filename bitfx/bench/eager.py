"""The main job's model run eagerly: ``python -m bitfx.bench eager``.

The main job's generation line compares its ternary model (``bitfx.quantize``, then eager) with
the float one. At its sizes the host sets the pace: a token costs what the host spends
dispatching and launching the forward's ops. This measures that path, with the main job's
architecture (:class:`bitfx.demo.example.ExampleLlama`, ``--size``, fp32, random weights, a
vocabulary of 64), under ``torch.no_grad()``, for the float model and the ternary one in each
eager launch form:

* ``ternary``: as it runs by default (fused norms, each leading the linears that read its
  output; the linears of one input launched together);
* ``ternary, no leads or groups``: ``BITFX_EAGER_GROUPS=0`` (the norm alone, each linear alone);
* ``ternary, model's norms``: ``BITFX_EAGER_NORMS=0`` as well (the norms as the model wrote them).

For each: the wall time of a forward of ``--rows`` tokens (``--calls`` back-to-back calls, the
GPU waited for at the end), generated tokens per second as the main job generates (no KV
cache, a window of 64, each token sampled on the host: one synchronize a token), and the
kernels one forward launches (the CUDA profiler). The forms take turns, ``--rounds`` times, and
the median of each is reported. The ternary forms' logits are compared: the first two must be
equal bit for bit (the leads and groups compute each linear's own output), the third within the
norm's tolerance. ``--device cpu`` runs a tiny smoke version (the ternary ops' torch reference:
a check of the script, not a speed).
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import time

import torch

from bitfx.bench import report

FORMS = {
    "float": {},
    "ternary": {},
    "ternary, no leads or groups": {"BITFX_EAGER_GROUPS": "0"},
    "ternary, model's norms": {"BITFX_EAGER_GROUPS": "0", "BITFX_EAGER_NORMS": "0"},
}
VOCAB = 64


@contextlib.contextmanager
def _env(settings: dict):
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None) -> int:
    p = report.parser("eager", __doc__)
    p.add_argument("--size", default="base", help="the main job's model size (default base: its GPU size)")
    p.add_argument("--rows", type=int, default=40, help="tokens of the timed forward (default 40)")
    p.add_argument("--calls", type=int, default=300, help="back-to-back forwards per round (default 300)")
    p.add_argument("--tokens", type=int, default=60, help="tokens generated per round (default 60)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, the forms taking turns (default 5)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="a folder for results.json and table.md")
    args = p.parse_args(argv)
    from bitfx.demo.train import SIZES, _generate  # the main job's model sizes and its generation loop

    if args.size not in SIZES:
        p.error(f"--size {args.size}: one of {', '.join(SIZES)}")
    cuda = report.need_cuda("eager", args.device, smoke=True)
    import bitfx
    from bitfx.bench.profiling import kernel_summary, profile
    from bitfx.bench.timing import sync
    from bitfx.demo.example import ExampleConfig, ExampleLlama

    dim, hidden, heads, layers = SIZES[args.size]
    if not cuda:  # the smoke run: a tiny model, few calls
        dim, hidden, heads, layers = 32, 64, 2, 2
        args.calls, args.tokens, args.rounds = min(args.calls, 3), min(args.tokens, 3), min(args.rounds, 2)
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = ExampleLlama(ExampleConfig(vocab=VOCAB, dim=dim, hidden=hidden, heads=heads, layers=layers))
    float_model = float_model.to(device).eval()
    ids = torch.randint(0, VOCAB, (1, args.rows), device=device)
    ternary = copy.deepcopy(float_model)
    with torch.no_grad():
        bitfx.quantize(ternary, ids)  # (as the main job converts its model: the output head stays dense)
    models = {name: (float_model if name == "float" else copy.deepcopy(ternary)) for name in FORMS}
    prompt = torch.randint(0, VOCAB, (20,), device=device)
    cmd = report.command("eager", argv)
    print(report.header(report.device_name(cuda), report.versions("triton", "transformers"), cmd,
                        f"model: dim {dim}, MLP {hidden}, {layers} layers, fp32, random weights, vocab {VOCAB}"))

    forward_us = {name: [] for name in FORMS}
    tok_s = {name: [] for name in FORMS}
    logits = {}
    with torch.no_grad():
        for name, model in models.items():  # untimed: the kernels compiled, the plans, groups and leads learned
            with _env(FORMS[name]):
                for _ in range(3):
                    logits[name] = model(ids)
                _generate(model, prompt, args.tokens, 64, torch.Generator().manual_seed(1))
        for r in range(args.rounds):
            for name, model in models.items():
                with _env(FORMS[name]):
                    sync(cuda)
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        model(ids)
                    sync(cuda)
                    forward_us[name].append(1e6 * (time.perf_counter() - t) / args.calls)
                    g = torch.Generator().manual_seed(2 + r)
                    t = time.perf_counter()
                    _generate(model, prompt, args.tokens, 64, g)
                    sync(cuda)
                    tok_s[name].append(args.tokens / (time.perf_counter() - t))
        kernels = {name: 0 for name in models}  # (no kernels on the CPU)
        for name, model in models.items() if cuda else ():
            with _env(FORMS[name]):
                counts = kernel_summary(profile(lambda: model(ids), cuda))
                kernels[name] = counts["kernels"] + counts["memops"]  # every CUDA launch

    exact = torch.equal(logits["ternary"], logits["ternary, no leads or groups"])
    scale = logits["ternary, model's norms"].abs().max().item()
    norms_diff = (logits["ternary"] - logits["ternary, model's norms"]).abs().max().item()
    med_f = {n: statistics.median(v) for n, v in forward_us.items()}
    med_t = {n: statistics.median(v) for n, v in tok_s.items()}
    lines = report.md_head(["form", "forward µs", "tokens/s", "vs float", "kernels a forward"])
    for name in FORMS:
        lines.append(report.md_row([name, f"{med_f[name]:.1f}", f"{med_t[name]:.1f}",
                                    report.times(med_t[name], med_t["float"]), kernels[name] if cuda else "—"]))
    table = "\n".join(lines)
    print(table)
    print(f"logits: ternary equals ternary without leads or groups bit for bit: {exact}; against the model's own "
          f"norms: largest difference {norms_diff:.2e} (scale {scale:.2f})")
    for name in FORMS:
        print(f"  {name}: forward µs {[round(v, 1) for v in forward_us[name]]}, tokens/s "
              f"{[round(v, 1) for v in tok_s[name]]}")
    if args.out:
        report.write_results(args.out, {"command": cmd, "forward_us": forward_us, "tokens_per_s": tok_s,
                                        "kernels": kernels, "exact": exact, "norms_diff": norms_diff}, table)
    if not exact:
        print("ternary logits differ with leads and groups off: they must not", file=sys.stderr)
        return 1
    return 0
