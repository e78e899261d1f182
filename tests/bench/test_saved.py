"""``python -m bitfx.bench saved``: what a compiled training step keeps for backward."""

from __future__ import annotations

import torch

from bitfx.bench import saved
from tests import models


def test_saved_bytes_sees_the_ternary_ops_codes():
    """bitfx's step keeps int8 activation codes and the packed 2-bit weights; Inductor's keeps
    neither; both keep float activations; parameters are not counted."""
    model, _ = models.tiny_llama()
    model.train()
    ids = torch.randint(0, models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    base = saved.saved_bytes(model, ids, "inductor")
    ours = saved.saved_bytes(model, ids, "bitfx")
    assert base["float32"] > 0 and "int8" not in base and "uint8" not in base
    assert ours["int8"] > 0 and ours["uint8"] > 0 and ours["float32"] > 0
    # every code row is one byte a feature: at least the codes of the 4 sites' inputs per layer
    assert ours["int8"] >= 4 * models.LAYERS * ids.numel() * models.HIDDEN
    assert all(p.grad is None for p in model.parameters())
