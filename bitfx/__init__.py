"""bitfx: BitNet b1.58 (ternary weights, int8 activations) as a compiler feature of PyTorch.

``import bitfx`` registers the ``torch.ops.bitfx.*`` operators (see :mod:`bitfx.ops`).
"""

from bitfx import ops, reference  # noqa: F401  (registers torch.ops.bitfx.*)
from bitfx.ops import bitlinear  # noqa: F401

__version__ = "0.1.0"
