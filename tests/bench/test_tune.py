"""``python -m bitfx.bench tune``'s candidates: every one is a configuration the launch rules accept
(no GPU needed to check that; the sweep itself needs one)."""

from __future__ import annotations

import torch

from bitfx.bench import tune
from bitfx.kernels.matmul_config import _config, _dp4a_config


def test_every_candidate_is_a_valid_configuration():
    cpu = torch.device("cpu")
    for M in (1, 4, 16, 300, 4096):
        cands = tune._candidates(M)
        assert cands[0] == (None, None, None)  # the current rule comes first
        for path, split, cfg in cands[1:]:
            if path == "dp4a":
                got = _dp4a_config.__wrapped__(M, 1152, 4320, cpu, split, cfg)
            else:
                got = _config.__wrapped__(M, 1152, 4320, cpu, path, split, cfg)
            assert got["SPLIT_K"] >= 1
        if M == 1:  # decode: K splits of the dp4a GEMV are among them
            assert {split for path, split, _ in cands if path == "dp4a"} >= {None, 2, 4, 8, 16}
