"""``python -m bitfx``: the bitfx ops on a built-in example, checked against the reference."""

from __future__ import annotations

import argparse
import sys

import torch

import bitfx
from bitfx import reference as ref

ops = torch.ops.bitfx


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bitfx", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-features", type=int, default=512)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    M, K, N = args.tokens, args.hidden, args.out_features
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    g = (1 + 0.1 * torch.randn(K, device=dev)).to(torch.bfloat16)
    w = (0.02 * torch.randn(N, K, device=dev)).to(torch.bfloat16)

    q, s_x = ops.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)
    packed, s_w = ops.weight_quant(w, False)
    out = ops.ternary_matmul(q, s_x, packed, s_w, None, torch.bfloat16)
    want = ref.bitlinear(x.cpu(), g.cpu(), w.cpu(), None, 1e-6)
    err = ((out.float().cpu() - want.float()).norm() / want.norm()).item()
    dense = torch.nn.functional.linear(ref.rms_norm(x, g, 1e-6), w).float().cpu()
    q_err = ((out.float().cpu() - dense).norm() / dense.norm()).item()
    print(f"bitfx {bitfx.__version__} on {dev}: RMSNorm -> ternary Linear, M={M} K={K} N={N}")
    print(f"  packed weight: {packed.numel()} bytes vs {w.numel() * 2} bytes bf16 ({w.numel() * 2 / packed.numel():.1f}x smaller)")
    print(f"  output vs eager reference: relative error {err:.2e}")
    print(f"  output vs the dense bf16 layer (quantization error): {q_err:.2e}")
    ok = err < 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
