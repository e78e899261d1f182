"""bitfx.load never leaves a model half loaded or silently wrong: a device it cannot reach, a
checkpoint that lacks tensors (strict=False), buffers the checkpoint does not hold, malformed
metadata, and flipped bits in any tensor are each refused or named, before the model changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitfx
from bitfx.checkpoint import CheckpointError
from tests.helpers import HAS_CUDA
from tests.test_checkpoint import _Net


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 5, 64)
    with torch.no_grad():
        bitfx.quantize(model, x)
        want = model(x)
    path = tmp_path_factory.mktemp("ckpt") / "n.safetensors"
    bitfx.save(model, path)
    return path, x, want


def _state(model):
    return {k: (v.device, v.dtype, v.clone() if not v.is_meta else None) for k, v in model.state_dict().items()}


def _unchanged(model, before):
    assert isinstance(model.up, nn.Linear) and not any(isinstance(m, bitfx.BitfxLinear) for m in model.modules())
    after = _state(model)
    assert after.keys() == before.keys()
    for k, (dev, dtype, t) in before.items():
        assert after[k][:2] == (dev, dtype), k
        assert (t is None and after[k][2] is None) or torch.equal(t, after[k][2]), k


# ---------------------------------------------------------------- a device it cannot reach


@pytest.mark.skipif(HAS_CUDA, reason="the machine has CUDA: no failure to provoke")
@pytest.mark.parametrize("meta_skeleton", [False, True])
def test_a_device_without_cuda_fails_before_the_model_changes(saved, meta_skeleton):
    path, x, want = saved
    with torch.device("meta" if meta_skeleton else "cpu"):
        model = _Net()
    before = _state(model)
    with pytest.raises(RuntimeError, match=r"could not move .* to cuda.*nothing was loaded"):
        bitfx.load(model, path, device="cuda")
    _unchanged(model, before)
    bitfx.load(model, path)  # and it still loads afterwards
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_a_device_torch_does_not_know_is_refused_first(saved):
    path, _, _ = saved
    model = _Net()
    before = _state(model)
    for bad in ("nonexistent", "cuda:x", 3.5):
        with pytest.raises(ValueError, match="is not a device torch knows"):
            bitfx.load(model, path, device=bad)
    _unchanged(model, before)


class _FailingNorm(nn.RMSNorm):
    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("a module of the user's that fails to load")


def test_a_failure_while_assigning_leaves_the_model_as_it_was(saved):
    """Every check passes, then a module of the model itself fails to load: the swapped linears
    and the tensors already assigned are put back."""
    path, _, _ = saved
    model = _Net()
    model.norm = _FailingNorm(64)
    before = _state(model)
    with pytest.raises(RuntimeError, match="a module of the user's that fails to load"):
        bitfx.load(model, path)
    _unchanged(model, before)


# ---------------------------------------------------------------- strict=False


def _without(path, out, names):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys() if k not in names}
    save_file(ts, str(out), metadata=meta)
    return out


def test_strict_false_names_what_is_missing_and_the_layer_raises_naming_itself(saved, tmp_path):
    path, x, want = saved
    lacking = _without(path, tmp_path / "lacking.safetensors", {"up.packed", "up.w_scale"})
    with torch.device("meta"):
        model = _Net()
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: up\.packed, up\.w_scale"):
        bitfx.load(model, lacking)
    with pytest.warns(UserWarning, match=r"holds no tensor for up\.packed, up\.w_scale.*ternary layers up\b"):
        bitfx.load(model, lacking, strict=False)
    assert isinstance(model.up, bitfx.BitfxLinear) and model.up.packed.is_meta
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"BitfxLinear 'up' \(in_features=64, out_features=96\) has no data "
                                               r"for packed, w_scale .*strict=False"):
            model(x)
        assert not model.gate.packed.is_meta
        model.gate(model.norm(x))  # the layers that were loaded run

