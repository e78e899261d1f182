"""bitfx: BitNet b1.58 (ternary weights, int8 activations) as a compiler feature of PyTorch.

``import bitfx`` registers the ``torch.ops.bitfx.*`` operators (see :mod:`bitfx.ops`). The
public API:

* ``torch.compile(model, backend="bitfx")`` (the backend: :mod:`bitfx.backend`): every linear
  but the head ternary by default (``BitfxConfig(linears=...)``), weights packed once;
* :func:`bitfx.quantize` converts a model once to packed 2-bit ternary linear layers;
* :func:`bitfx.save` / :func:`bitfx.load` write and read safetensors checkpoints of converted models;
* :func:`bitfx.from_pretrained` / :func:`bitfx.save_pretrained` read and write BitNet checkpoint
  directories in transformers' format (config.json with ``quant_method: "bitnet"``, safetensors);
* :mod:`bitfx.hf_bitnet` swaps transformers' BitNet layers to and from ``BitfxLinear`` (it
  imports transformers only inside the functions that need it, so ``import bitfx`` does not);
* :func:`bitfx.export_gguf` writes a converted Llama-style model as GGUF for llama.cpp (ternary
  layers in ``TQ2_0``);
* :func:`bitfx.explain` reports every linear's decision, the sites (a site is an RMSNorm and the
  Linear layers it feeds), the linears that quantize their input alone, and what it rejects;
* :func:`bitfx.bitlinear`, the differentiable BitLinear layer as a function;
* :func:`bitfx.finetune` trains a float model as a ternary one from its own weights, optionally
  distilled from the frozen float model.
"""

from bitfx import ops, reference  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.ops import bitlinear  # noqa: F401
from bitfx.config import BitfxConfig  # noqa: F401
from bitfx.modules import BitfxLinear, Int8Linear  # noqa: F401
from bitfx.explain import explain, ExplainReport  # noqa: F401,E402
from bitfx.quantize import quantize, QuantizeConfig, QuantizeReport  # noqa: F401,E402
from bitfx.checkpoint import save, load, CheckpointError  # noqa: F401,E402
from bitfx import hf_bitnet  # noqa: F401,E402  (bitfx.hf_bitnet after import bitfx)
from bitfx.pretrained import from_pretrained, save_pretrained  # noqa: F401,E402
from bitfx.gguf_export import export_gguf  # noqa: F401,E402
from bitfx.finetune import finetune, FinetuneResult, distillation_loss, load_float_model  # noqa: F401,E402

__version__ = "0.1.0"
