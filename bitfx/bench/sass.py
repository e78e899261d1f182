"""What the decode kernels cost per thread, compiled for a GPU on a machine without one:
``python -m bitfx.bench sass``.

Triton compiles a kernel for a target it is told (``GPUTarget("cuda", 90, 32)``: Hopper) with
the ``ptxas`` its wheel carries; ``cuobjdump`` (in the same wheel) reads the registers, the
stack (spills) and the machine instructions (SASS) of the result. For each decode site of a
model shape (the stacked weights of one layer: q/k/v, o, gate/up, down), this compiles the
kernels the launch rules pick for one token (M = 1), with the constexprs they pass and the
specialization a real launch gets (pointers and sizes divisible by 16), and prints a table:

* ``norm_quant`` and the dp4a GEMV: the two-kernel path;
* ``front_gemv``: the norm, the codes and the GEMV in one kernel (``BITFX_FRONT_GEMV=1``);

and, per model, the decode attention (``bitfx::decode_attention``, a bool mask) on the
benchmark's 128-slot cache and on a 4096-slot one, whose keys are split over programs and
combined by a second kernel.

Static counts (the whole kernel's code per thread), not run time: what they show is where a
kernel spills or grows, without a GPU. ``--sms`` sets the SM count the launch rules size the
grids for (132: H100 SXM and H200).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

from bitfx.bench import report

# (K, N) of one layer's decode sites, weights stacked as the backend stacks them.
SHAPES = {
    "bitnet-2b4t": [(2560, 3840), (2560, 2560), (2560, 13824), (6912, 2560)],
    "llama-1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
    "llama-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
            torch.uint8: "*u8", torch.int32: "*i32"}


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        sys.exit(f"python -m bitfx.bench sass: {name} not found in the Triton wheel ({path})")
    return path


def compile_kernel(fn, types: dict, constexprs: dict, num_warps: int, arch: int = 90, **options) -> bytes:
    """The cubin of ``fn`` for ``sm_<arch>``: ``types`` the runtime arguments' Triton types in
    order (``"*bf16"``, ``"i32"``, ...), ``constexprs`` the rest; pointers and ints marked
    16-divisible, as a launch specializes aligned tensors and sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    runtime = [n for n in names if n not in constexprs]
    if runtime != list(types):
        raise ValueError(f"{fn.__name__}: runtime arguments {runtime}, types given for {list(types)}")
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in types and (types[n].startswith("*") or types[n] == "i32")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=1, **options))
    return kernel.asm["cubin"]


def usage(cubin: bytes) -> dict:
    """``{"registers", "stack", "sass"}`` of a cubin: registers per thread, stack bytes (spills
    land there), machine instructions in the code."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    fields = {}
    for token in res.stdout.replace(",", " ").split():
        if ":" in token:
            key, _, value = token.partition(":")
            if value.isdigit():
                fields[key] = int(value)
    instructions = sum(1 for line in sass.stdout.splitlines() if "/*" in line and ";" in line)
    return {"registers": fields.get("REG", -1), "stack": fields.get("STACK", 0) + fields.get("LOCAL", 0),
            "sass": instructions}


def site_kernels(K: int, N: int, sms: int, dtype=torch.bfloat16) -> list:
    """``[(name, fn, types, constexprs, num_warps, options)]``: what a decode site of this shape launches
    (a Llama-style bf16 norm with a weight), as the launch rules choose it on a GPU of ``sms`` SMs."""
    from bitfx import layout
    from bitfx.kernels import front_gemv as fg, norm_quant as nq, ternary_matmul as tm

    Kq = layout.packed_k(K)
    x, code = _POINTER[dtype], {torch.bfloat16: 3, torch.float16: 1, torch.float32: 0}[dtype]
    norm = dict(NORM=True, HAS_WEIGHT=True, OFFSET=False, CAST_BEFORE_WEIGHT=True, X_ROUND=code, Y_ROUND=code, QMAX=127)
    block, one_block = nq._row_block(K, nq._MAX_ROW_BLOCK)
    out = [("norm_quant", nq._norm_quant_kernel,
            dict(X=x, W=x, Q="*i8", SCALE="*fp32", RSTD="*fp32", stride_x="i32", K="i32", eps="fp32",
                 stride_r="i32"),
            dict(norm, BLOCK_K=block, ONE_BLOCK=one_block, PDL_TRIGGER=True, EARLY_G=True, RN_MUL=False,
                 R=None, H=None, RESIDUAL=False, GATE=0, EXACT_EXP=True, PDL_WAIT=True),  # no residual add, no gate
            nq._num_warps(block), dict(enable_fp_fusion=False))]
    device = torch.device("cpu")
    cfg = tm._dp4a_config(1, N, Kq, device, None, None, sms)
    out.append(("dp4a GEMV", tm._ternary_dp4a_kernel,
                dict(q_ptr="*i32", sx_ptr="*fp32", w_ptr="*i32", sw_ptr="*fp32", bias_ptr=x, out_ptr=x, ws_ptr="*i32",
                     lock_ptr="*i32", M="i32", N="i32", K4="i32", Kq4="i32", words_per_split="i32", stride_qm="i32",
                     stride_wn="i32", stride_om="i32"),
                dict(BLOCK_M=1, BLOCK_N=cfg["BLOCK_N"], BLOCK_W=cfg["BLOCK_W"], SPLIT_K=cfg["SPLIT_K"], USE_ASM=True,
                     FLOAT_OUT=True, HAS_BIAS=False, EVEN_W=(Kq // 4) % cfg["BLOCK_W"] == 0, STREAM_HINT=True,
                     EVEN_K=True, PDL=True, PREFETCH=True, BYTE_PTRS=False),
                cfg["num_warps"], {}))
    fcfg = fg.front_config(N, Kq, device, sms=sms)
    out.append(("front_gemv", fg._front_gemv_kernel,
                dict(X=x, W=x, w_ptr="*i32", sw_ptr="*fp32", bias_ptr=x, out_ptr=x, SX="*fp32",
                     **{f"{a}{p}": "i32" for a in "NTC" for p in (1, 2, 3)}, N="i32", K="i32",
                     Kq4="i32", stride_x="i32", stride_wn="i32", stride_om="i32", eps="fp32"),
                dict(norm, BLOCK_K=min(fg._ROW_CHUNK, fg.next_pow2(max(K, 256))), BLOCK_N=fcfg["BLOCK_N"],
                     BLOCK_W=fcfg["BLOCK_W"], EVEN_W=fcfg["EVEN_W"], USE_ASM=True, HAS_BIAS=False, STREAM_HINT=True,
                     PDL=True, PREFETCH=True, RN_MUL=True, BYTE_PTRS=False, WRITE_SX=True, PARTS=1, WRITE_Y=False,
                     GEMV=True, Y=None,
                     **{f"{a}{p}": None for a in ("w", "sw", "b") for p in (1, 2, 3)}),  # one linear: no parts, no y
                fg._NUM_WARPS, dict(maxnreg=fg._MAX_REGS)))
    return out


# Cache lengths the attention rows compile for: the decode benchmark's, and a long one (split).
ATTENTION_KEYS = (128, 4096)


def attention_kernels(model: str, L: int, sms: int, dtype=torch.bfloat16) -> list:
    """``[(name, fn, types, constexprs, num_warps, options)]``: what ``decode_attention`` launches
    for ``model``'s heads (batch 1, a bool mask) against ``L`` cached keys."""
    from bitfx.bench.model_shapes import MODELS
    from bitfx.kernels import attention as ka

    fields = MODELS[model][1]
    heads = fields["num_attention_heads"]
    D = fields.get("head_dim", fields["hidden_size"] // heads)
    splits, _, block_l, warps = ka.config(heads, L, D, sms)
    x = _POINTER[dtype]
    part = "*fp32" if splits > 1 else x
    types = dict(q_ptr=x, k_ptr=x, v_ptr=x, mask_ptr="*u8", o_ptr=x, part_ptr=part, stat_ptr=part, Hq="i32", L="i32",
                 D="i32", group="i32", chunk="i32", scale="fp32",
                 **{n: "i32" for n in ("sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sm_b", "sm_h",
                                       "sm_l", "so_b", "so_h")})
    out = [("attention", ka._attend_kernel, types,
            dict(MASK=1, SPLIT=splits > 1, PDL_TRIGGER=splits == 1, BLOCK_L=block_l, BLOCK_D=ka.next_pow2(D)), warps,
            {})]
    if splits > 1:
        out.append(("attention combine", ka._combine_kernel,
                    dict(part_ptr="*fp32", stat_ptr="*fp32", o_ptr=x, Hq="i32", D="i32", splits="i32", so_b="i32",
                         so_h="i32"),
                    dict(BLOCK_S=ka.next_pow2(splits), BLOCK_D=ka.next_pow2(D)), 4, {}))
    return out


def _shape(c: dict) -> str:
    if "BLOCK_L" in c:
        return f"{c['BLOCK_L']} keys x {c['BLOCK_D']}" + (", split" if c["SPLIT"] else "")
    if "BLOCK_S" in c:
        return f"{c['BLOCK_S']} splits x {c['BLOCK_D']}"
    if "BLOCK_W" in c:
        return f"{c['BLOCK_N']} rows x {c['BLOCK_W']} words" + (f", split {c['SPLIT_K']}" if c.get("SPLIT_K", 1) > 1 else "")
    return f"{c['BLOCK_K']}-element row block" if c.get("ONE_BLOCK") else f"{c['BLOCK_K']}-element chunks"


def main(argv=None) -> int:
    p = report.parser("sass", __doc__)
    p.add_argument("--models", default="bitnet-2b4t", help=f"comma-separated, from {','.join(SHAPES)}")
    p.add_argument("--sms", type=int, default=132, help="SMs the launch rules size the grids for (default 132)")
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 to compile for (default 90)")
    args = p.parse_args(argv)
    from bitfx.kernels._utils import interpreting

    if interpreting():
        sys.exit("python -m bitfx.bench sass compiles the kernels: unset TRITON_INTERPRET")
    import triton

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SHAPES]
    if unknown:
        sys.exit(f"python -m bitfx.bench sass: unknown model(s) {unknown}; choose from {list(SHAPES)}")
    print(f"Triton {triton.__version__}, sm_{args.arch}, grids sized for {args.sms} SMs; "
          f"command: {report.command('sass', argv)}\n")
    print("| model | site (K x N) | kernel | warps | block | registers | stack bytes | SASS instructions |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in names:
        for K, N in SHAPES[model]:
            for name, fn, types, constexprs, warps, options in site_kernels(K, N, args.sms):
                u = usage(compile_kernel(fn, types, constexprs, warps, args.arch, **options))
                print(f"| {model} | {K} x {N} | {name} | {warps} | {_shape(constexprs)} | {u['registers']} | "
                      f"{u['stack']} | {u['sass']} |", flush=True)
        for L in ATTENTION_KEYS:
            for name, fn, types, constexprs, warps, options in attention_kernels(model, L, args.sms):
                u = usage(compile_kernel(fn, types, constexprs, warps, args.arch, **options))
                print(f"| {model} | {L} keys | {name} | {warps} | {_shape(constexprs)} | {u['registers']} | "
                      f"{u['stack']} | {u['sass']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
