"""The ``bitfx::`` operators (``torch.ops.bitfx.*``), registered when this package is imported.

* :mod:`bitfx.ops.library`: the catalogue of schemas (:data:`~bitfx.ops.library.SCHEMAS`),
  the one registration helper and the input checks;
* :mod:`bitfx.ops.inference`: ``norm_quant``, ``add_norm_quant`` (a residual add, then
  ``norm_quant`` of the sum), ``glu_quant`` (a gated MLP's activation, then ``norm_quant`` or
  ``act_quant`` of it), ``act_quant``, ``weight_quant``,
  ``ternary_matmul``, ``ternary_linear`` (the two in one), ``dequantize``, and the one CUDA
  front (norm or activation quantization);
* :mod:`bitfx.ops.training`: ``weight_quant_stacked`` and ``weight_quant_stacks`` (a training
  graph's weights packed per site, or all at once), ``bitlinear_stacked`` (what the backend
  emits in training), ``ternary_linear_group`` (frozen packed weights in grad mode), and
  :func:`bitlinear`, the differentiable BitLinear layer as a function; ``concat_buffer``
  (a cat that Inductor lowers as one buffer its parts are written into: a stacked output's
  gradient, :mod:`bitfx.ops.lowering`);
* :mod:`bitfx.ops.head`: ``int8_rows`` and ``int8_linear``, the int8 output head
  (``BitfxConfig(head="int8")``);
* :mod:`bitfx.ops.attention`: ``decode_attention``, one query per head against a grouped
  key/value cache (the backend's decode graphs under CUDA graphs);
* :mod:`bitfx.ops.fp8`: the FP8 matmuls of the training ops' optional FP8 backward.

Every op has a plain-torch implementation (the reference, :mod:`bitfx.reference`: the CPU and
any device without a kernel), a Triton one on CUDA (:mod:`bitfx.kernels`), and a fake one for
``torch.compile``. The names below are the ``torch.ops.bitfx`` overload packets.
"""

import torch

from bitfx.ops import attention, head, inference, training  # noqa: F401  (registers the ops)
from bitfx.ops.library import SCHEMAS
from bitfx.ops.training import bitlinear

norm_quant = torch.ops.bitfx.norm_quant
add_norm_quant = torch.ops.bitfx.add_norm_quant
glu_quant = torch.ops.bitfx.glu_quant
act_quant = torch.ops.bitfx.act_quant
weight_quant = torch.ops.bitfx.weight_quant
ternary_matmul = torch.ops.bitfx.ternary_matmul
ternary_linear = torch.ops.bitfx.ternary_linear
dequantize = torch.ops.bitfx.dequantize
ternary_linear_group = torch.ops.bitfx.ternary_linear_group
weight_quant_stacked = torch.ops.bitfx.weight_quant_stacked
weight_quant_stacks = torch.ops.bitfx.weight_quant_stacks
bitlinear_stacked = torch.ops.bitfx.bitlinear_stacked
concat_buffer = torch.ops.bitfx.concat_buffer
int8_rows = torch.ops.bitfx.int8_rows
int8_linear = torch.ops.bitfx.int8_linear
decode_attention = torch.ops.bitfx.decode_attention

__all__ = ["SCHEMAS", "bitlinear", *SCHEMAS]
