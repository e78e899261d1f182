"""Compile, for sm_90, every kernel launch the ops' forms launched by Inductor make, with the
argument types Inductor's code gives them (a Python float as fp64, sizes as i32); run by
``test_traced_launches_compile_for_hopper`` in a subprocess without Triton's interpreter.

The launches are recorded from the forms' own bodies (``Launcher.traced`` replaced by a
recorder), on CPU tensors, so the constexprs are the launch rules' own; the two that follow
the device (``RN_MUL``, ``USE_ASM``) are set as on an NVIDIA GPU. Prints one line per launch."""

import os
import sys

import torch

os.environ["BITFX_FRONT_GEMV"] = "1"  # the one-kernel linear's launch too

import bitfx  # noqa: F401
from bitfx.kernels._launch import Launcher
from bitfx.ops import inductor  # noqa: F401  (registers the forms)

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
          torch.uint8: "u8", torch.int32: "i32"}
recorded = []


def record(self, grid, args, constexprs, num_warps, num_stages=3):
    recorded.append((self.fn, args, dict(constexprs), num_warps, num_stages))


Launcher.traced = record
ops = torch.ops.bitfx
gen = torch.Generator().manual_seed(0)
for K, N, M in ((2560, 3840, 1), (2560, 3840, 7), (6912, 2560, 300), (40, 24, 1)):
    x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
    g = torch.ones(K, dtype=torch.bfloat16)
    packed, s_w = ops.weight_quant(torch.randn(N, K, generator=gen), False)
    bias = torch.randn(N, generator=gen).to(torch.bfloat16)
    q, s = ops.norm_quant(x, g, 1e-6, False, True, torch.bfloat16)
    for fn, a in ((ops.norm_quant_triton, (x, g, 1e-6, False, True, torch.bfloat16)),
                  (ops.add_norm_quant_triton, (x, x * 2, g, 1e-6, False, True, torch.bfloat16)),
                  (ops.glu_quant_triton, (x, x * 2, "silu", g, 1e-6, False, True, torch.bfloat16, True)),
                  (ops.glu_quant_triton, (x, x * 2, "relu2", None, 0.0, False, False, torch.float32, False)),
                  (ops.act_quant_triton, (x,)),
                  (ops.ternary_matmul_triton, (q, s, packed, s_w, bias, torch.bfloat16, K)),
                  (ops.ternary_linear_triton, (x, g, 1e-6, False, True, torch.bfloat16, True, 8, packed, s_w, bias,
                                               torch.bfloat16, K)),
                  (ops.bitlinear_stacked_triton, (x, g, [torch.randn(N, K, generator=gen)], packed, s_w, bias, 1e-6,
                                                  False, True, torch.bfloat16, True, False))):
        with torch.no_grad():
            fn(*a)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def type_of(a):
    if isinstance(a, torch.Tensor):
        return "*" + _TYPES[a.dtype]
    if isinstance(a, bool):
        return "i1"
    if isinstance(a, int):
        return "i32" if -2**31 <= a < 2**31 else "i64"
    if isinstance(a, float):
        return "fp64"  # what Inductor's generated code declares for a Python float
    raise TypeError(type(a))


seen = set()
for fn, args, constexprs, num_warps, num_stages in recorded:
    for name in ("RN_MUL", "USE_ASM"):
        if name in constexprs:
            constexprs[name] = True
    names = list(fn.arg_names)
    signature = {n: type_of(a) for n, a in zip(names, args)}
    signature.update({n: "constexpr" for n in names[len(args):]})
    key = (fn.__name__, tuple(signature.items()), tuple(constexprs.items()), num_warps)
    if key in seen:
        continue
    seen.add(key)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    print("compiled", fn.__name__, num_warps, sorted(constexprs.items()))
kinds = {k[0] for k in seen}
print("kernels:", sorted(kinds))
sys.exit(0 if {"_norm_quant_kernel", "_ternary_dp4a_kernel", "_ternary_matmul_kernel", "_front_gemv_kernel"} <= kinds
         else 1)
