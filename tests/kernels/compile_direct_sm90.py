"""Compile, for sm_90, the kernel launches that bitfx's launcher (``Launcher.__call__``) makes
for shapes with a dimension of 1, with the types Triton itself gives the arguments of a direct
launch: an int equal to 1 becomes the constant 1 (as None does), so kernel code that treats a
size as a tensor (``N.to(...)``) fails to compile there, and only there; Triton's interpreter
runs it. Run by ``test_direct_launches_compile_for_hopper`` in a subprocess without the
interpreter. The launches are recorded (not run) from the launchers' callers on CPU tensors, and the inference weight
packing's launches are written out as its functions make them; prints one line per kernel
compiled."""

import sys

import torch

import bitfx  # noqa: F401
from bitfx.kernels import weight_pack
from bitfx.kernels._launch import Launcher

recorded = []


def record(self, grid, args, constexprs, **options):
    recorded.append((self.fn, args, dict(constexprs), options))


Launcher.__call__ = record
gen = torch.Generator().manual_seed(0)


def w(N, K, dtype=torch.bfloat16):
    return torch.randn(N, K, generator=gen).to(dtype)


# The training step's stacked weight packing: one-row weights, K = 1, mixed scale groups.
for stack, flags in (([w(1, 1)], [False]), ([w(1, 1)], [True]), ([w(3, 5), w(1, 5, torch.float32)], [False, True]),
                     ([w(1, 7), w(2, 7)], [False, False]), ([w(64, 2560), w(16, 2560), w(16, 2560)], [False, False, True]),
                     ([w(1, 2560)], [False])):
    weight_pack.weight_quant_stacked(stack, flags)
# Every stack at once (the launch tables): two dtypes, K of 1 and 2560, one-row weights.
weight_pack.weight_quant_stacks([w(1, 1), w(3, 5), w(1, 5, torch.float32), w(64, 2560), w(1, 2560)],
                                [False, True, False, True, False], [1, 2, 2])
# Weights read 16 bytes at a time (DENSE): rows of whole 16 bytes, aligned, in both dtypes.
weight_pack.weight_quant_stacks([w(64, 2560), w(1, 2560), w(8, 64, torch.float32)], [False, True, False], [2, 1])

# The training backward's weight dequantization and the codes' unpacking: one-row weights, K = 1.
for N, K in ((1, 1), (3, 5), (1, 2560), (64, 2560)):
    codes = torch.zeros(N, -(-K // 4), dtype=torch.uint8)
    weight_pack.unpack_run(codes, torch.ones(N), K, torch.bfloat16)
    weight_pack.unpack_run(codes, None, K, torch.int8)


class _Direct:  # a launch of weight_scale / quantize_pack (``kernel[grid](...)``), recorded the same way
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, args, **constexprs):
        recorded.append((self.fn, args, constexprs, dict(num_warps=4, num_stages=3)))  # Triton's defaults


for N, K, wt in ((1, 5, w(1, 5)), (3, 1, w(3, 1)), (64, 2560, w(64, 2560, torch.float32).t().contiguous().t())):
    s, p = torch.ones(N), torch.empty(N, -(-K // 4), dtype=torch.uint8)
    for finish in (False, True):
        _Direct(weight_pack._abs_row_sum_kernel)((wt, s, 0, N, K, wt.stride(0), wt.stride(1)), FINISH=finish,
                                                 BLOCK_N=4, BLOCK_K=1024)
    _Direct(weight_pack._tensor_scale_kernel)((s, N, float(N * K)), BLOCK=1024)
    _Direct(weight_pack._quantize_pack_kernel)((wt, s, p, N, K, p.shape[1], wt.stride(0), wt.stride(1)), BLOCK_N=16,
                                               BLOCK_KQ=256)

import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

seen = set()
for fn, args, constexprs, options in recorded:
    names = list(fn.arg_names)
    signature, consts = {}, dict(constexprs)
    for name, a in zip(names, args):
        kind = native_specialize_impl(BaseBackend, a, False, True, True)[0]  # what a direct launch passes
        signature[name] = kind
        if kind == "constexpr":
            consts[name] = a
    signature.update({n: "constexpr" for n in names[len(args):]})
    key = (fn.__name__, tuple(signature.items()), tuple(sorted(consts.items(), key=str)), tuple(options.items()))
    if key in seen:
        continue
    seen.add(key)
    src = ASTSource(fn=fn, signature=signature, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    print("compiled", fn.__name__, sorted(k for k, v in signature.items() if v == "constexpr" and k not in constexprs))
sys.exit(0 if {"_abs_row_sum_kernel", "_stack_pack_kernel", "_tensor_scale_kernel", "_quantize_pack_kernel",
               "_table_row_sum_kernel", "_table_scale_kernel", "_table_pack_kernel"}
         <= {k[0] for k in seen} else 1)
