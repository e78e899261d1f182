"""Trace a chain of training sites through ``bitlinear_stacked_triton`` (the training op's form
launched by Inductor) with AOTAutograd, twice: with torch's kernel access analysis as it is, and
inside :func:`bitfx.ops.inductor.kernel_analysis_memo`; run by
``test_memo_traces_the_same_graph_with_fewer_analyses`` in a subprocess without Triton's
interpreter. Torch builds the kernels' Triton IR for sm_90 (a target set here: this machine may
have no GPU), so the analysis is the real one. Prints the forward graph's code hash and the
number of analyses of each trace; exits 1 unless the graphs are the same, the memo's trace
analysed each of the two kernels once and the plain one every call."""

import hashlib
import re
import sys

import torch
import triton.runtime.driver as driver
from triton.backends.compiler import GPUTarget


class _Hopper:  # what torch's analysis asks of the driver: the target to build the IR for
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def __getattr__(self, name):
        raise AttributeError(name)


if not hasattr(driver, "set_active"):  # a Triton without a settable driver: nothing to check here
    print("this Triton cannot set its active driver")
    sys.exit(3)
driver.set_active(_Hopper())

import bitfx  # noqa: E402,F401
from bitfx.ops import inductor  # noqa: E402
from torch._functorch.aot_autograd import aot_function  # noqa: E402
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402

ops = torch.ops.bitfx
SITES, M, K, N = 6, 64, 64, 96
name = next(n for n in inductor._ANALYSES if n in vars(triton_kernel_wrap))
original = getattr(triton_kernel_wrap, name)
analysed = []


def counting(*args, **kw):
    analysed.append(args[0])
    return original(*args, **kw)


setattr(triton_kernel_wrap, name, counting)


def chain(x, g, *ws):
    h = x
    for w in ws:
        packed, scale = ops.weight_quant_stacked([w], [False])
        out = ops.bitlinear_stacked_triton(h, g, [w], packed, scale, None, 1e-6, False, True, torch.bfloat16, True,
                                           False)[0]
        h = out[:, :K] + h
    return h.sum()


class Traced(Exception):
    pass


def trace():
    graphs = []

    def compiler(gm, _):
        # The kernels' side-table indices count on from one trace to the next: left out.
        code = re.sub(r"(kernel_idx|constant_args_idx) = \d+", r"\1 = _", gm.code)
        graphs.append(hashlib.sha256(code.encode()).hexdigest())
        raise Traced

    x = torch.randn(M, K).bfloat16().requires_grad_()
    g = torch.ones(K, dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True) for _ in range(SITES)]
    try:
        aot_function(chain, fw_compiler=compiler, bw_compiler=compiler)(x, g, *ws)
    except Traced:
        pass
    return graphs[0]


plain = trace()
n_plain = len(analysed)
analysed.clear()
with inductor.kernel_analysis_memo():
    memo = trace()
n_memo = len(analysed)
print("graph", plain == memo, "analyses", n_plain, n_memo)
# Without the memo every call is analysed (12 calls of two kernels); with it, each kernel once.
sys.exit(0 if plain == memo and n_memo == 2 and n_plain >= 2 * SITES else 1)
