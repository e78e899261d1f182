"""Host time per bitfx op: ``python -m bitfx.bench host`` (CUDA only).

Outside CUDA graphs every op costs the host its dispatch and its kernel launch; at decode that
is more than the kernels run. This times, for M = 1 and K = N = 4096 (bf16), 2000 back-to-back
calls of each op with no synchronize between them (:func:`bitfx.bench.timing.host_s`: the
host, not the GPU, sets the pace) and prints microseconds per call: the ops through
``torch.ops.bitfx`` (the dispatcher), their Triton launchers called directly, and ``F.linear``
for scale.
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
    if not torch.cuda.is_available():
        sys.exit("python -m bitfx.bench host needs a CUDA GPU")
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
    print(report.header(report.device_name(), {"torch": torch.__version__}, report.command("host", argv),
                        f"M=1, K=N={K}, bf16"))
    for name, fn in cases:
        print(f"{name:28s} host {host_s(fn, calls=args.calls) * 1e6:7.1f} us/call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
