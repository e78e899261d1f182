"""Host time per bitfx op: ``python -m bitfx.bench_host`` (CUDA only).

Outside CUDA graphs every op costs the host its dispatch and its kernel launch; at decode that
is more than the kernels run. This times, for M = 1 and K = N = 4096 (bf16), 2000 back-to-back
calls of each op with no synchronize between them (so that the host, not the GPU, sets the
pace) and prints microseconds per call: the ops through ``torch.ops.bitfx`` (the dispatcher),
their Triton launchers called directly, and ``F.linear`` for scale.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import bitfx  # noqa: F401  (registers the ops)
from bitfx.kernels import norm_quant as nqk
from bitfx.kernels import ternary_matmul as tmk

ops = torch.ops.bitfx


def host_us(fn, calls: int = 2000, warmup: int = 50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return dt * 1e6


def main(argv=None) -> int:
    if not torch.cuda.is_available():
        sys.exit("bitfx.bench_host needs a CUDA GPU")
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
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; M=1, K=N={K}, bf16")
    for name, fn in cases:
        print(f"{name:28s} host {host_us(fn):7.1f} us/call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
