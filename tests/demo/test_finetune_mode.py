"""``python -m bitfx finetune``: the main job's float model fine-tuned into a ternary one, with
held-out figures, the steps to within 10% of float and the loss plot."""

from __future__ import annotations

import pytest

from bitfx.__main__ import main


def test_finetune_mode_runs_to_the_end(tmp_path, capsys):
    assert main(["finetune", "--size", "tiny", "--float-steps", "10", "--steps", "4", "--eval-every", "4",
                 "--batch", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for figure in ("training the float model first (10 steps", "held-out loss: float",
                   "converted by bitfx.quantize without training", "fine-tuned ternary model: held-out",
                   "loss curves"):
        assert figure in out, figure
    assert out.rstrip().endswith("OK")
    assert (tmp_path / "finetune.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_finetune_mode_names_a_bad_argument(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--steps", "0"])
    assert "--steps must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--alpha", "2"])
    assert "--alpha must be in [0, 1]" in capsys.readouterr().err
