"""Host time per bitfx op: ``python -m bitfx.bench host`` (CUDA only).

Outside CUDA graphs every op costs the host its dispatch and its kernel launch; at decode that
is more than the kernels run. This times, for M = 1 and K = N = 4096 (bf16), 2000 back-to-back
calls of each op with no synchronize between them, under ``torch.no_grad()``
(:func:`bitfx.bench.timing.host_s`: the host, not the GPU, sets the pace) and prints
microseconds per call: the ops through ``torch.ops.bitfx`` (the dispatcher), their Triton
launchers called directly, and ``F.linear`` for scale; the eager modules, there and at the main
job's GPU layer (256 -> 704, fp32, a prompt of 64 rows); then one RMSNorm -> Linear site
compiled in default mode (no CUDA graphs): bf16 under Inductor, and the ``bitfx`` backend with
the kernels launched by Inductor's code (``launch="inductor"``, what the default ``"auto"``
does outside CUDA graphs) and by the custom ops (``launch="op"``).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bitfx.bench import report
from bitfx.bench.timing import host_s


def main(argv=None) -> int:
    p = report.parser("host", __doc__)
    p.add_argument("--calls", type=int, default=2000, help="back-to-back calls timed per op (default 2000)")
    args = p.parse_args(argv)
    report.need_cuda("host")
    import bitfx  # noqa: F401  (registers the ops)
    from bitfx.kernels import norm_quant as nqk
    from bitfx.kernels import ternary_matmul as tmk

    ops = torch.ops.bitfx
    K = N = 4096
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    g = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    packed, s_w = ops.weight_quant(w, False)
    q, s_x = ops.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)
    cases = [
        ("F.linear", lambda: F.linear(x, w)),
        ("bitfx.ternary_matmul (op)", lambda: ops.ternary_matmul(q, s_x, packed, s_w, None, torch.bfloat16, K)),
        ("ternary_matmul launcher", lambda: tmk.ternary_matmul(q, s_x, packed, s_w, None, torch.bfloat16)),
        ("bitfx.norm_quant (op)", lambda: ops.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)),
        ("norm_quant launcher", lambda: nqk.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)),
        ("bitfx.act_quant (op)", lambda: ops.act_quant(x)),
    ]
    from bitfx.modules import BitfxLinear

    linear = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    ternary = BitfxLinear.from_linear(linear)
    cases += [("nn.Linear (eager module)", lambda: linear(x)), ("BitfxLinear (eager module)", lambda: ternary(x))]
    # The main job's generation: its GPU model's 256 -> 704 layer, fp32, on a prompt of 64 rows
    # (the one-kernel form, bitfx.kernels.front_gemv.takes_rows).
    small = torch.nn.Linear(256, 704, bias=False, device="cuda")
    small_t = BitfxLinear.from_linear(small)
    xs = torch.randn(64, 256, device="cuda")
    cases += [("nn.Linear 256x704, M=64", lambda: small(xs)), ("BitfxLinear 256x704, M=64", lambda: small_t(xs))]
    cases += _compiled_sites(K, N)
    print(report.header(report.device_name(), {"torch": torch.__version__}, report.command("host", argv),
                        f"M=1, K=N={K}, bf16"))
    with torch.no_grad():  # inference, as a generation loop runs it (no autograd graph for nn.Linear)
        for name, fn in cases:
            print(f"{name:28s} host {host_s(fn, calls=args.calls) * 1e6:7.1f} us/call", flush=True)
    return 0


def _compiled_sites(K: int, N: int) -> list:
    """One RMSNorm -> Linear site (bf16, M = 1) compiled in default mode, three ways; each
    compiled (and checked against the others) before it is timed."""
    import copy

    from torch import nn

    site = nn.Sequential(nn.RMSNorm(K, eps=1e-6), nn.Linear(K, N, bias=False)).to("cuda", torch.bfloat16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    ways = [("site, bf16 Inductor", {}), ("site, bitfx (Inductor launches)", dict(backend="bitfx", options={"launch": "inductor"})),
            ("site, bitfx (custom ops)", dict(backend="bitfx", options={"launch": "op"}))]
    cases = []
    outs = []
    for name, kwargs in ways:
        fn = torch.compile(copy.deepcopy(site), **kwargs)
        with torch.no_grad():
            outs.append(fn(x).float())

        def call(fn=fn):
            with torch.no_grad():
                return fn(x)

        cases.append((name, call))
    if not torch.equal(outs[1], outs[2]):
        raise RuntimeError("bench host: the two bitfx launches disagree")
    return cases


if __name__ == "__main__":
    sys.exit(main())
