"""bitfx.save / bitfx.load: safetensors checkpoints of converted models, bit-identical after a
round trip, tied tensors kept tied, and every bad checkpoint refused with its problem named
before the model changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import bitfx
from bitfx.checkpoint import CHECKPOINT_VERSION, CheckpointError
from tests import models
from tests.helpers import HAS_CUDA


def _quantized(builder=models.tiny_llama, dtype=torch.bfloat16):
    model, ids = builder(dtype=dtype)
    skeleton = copy.deepcopy(model)
    with torch.no_grad():
        bitfx.quantize(model, ids)
    return model, skeleton, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_is_bit_identical(tmp_path):
    model, skeleton, ids = _quantized()
    path = tmp_path / "m.safetensors"
    bitfx.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "bitfx-checkpoint" and meta["format_version"] == str(CHECKPOINT_VERSION)
    assert meta["layout"] == "bitfx-ternary-2bit-planes-v1" and "w_scale" in meta["scale"]
    ternary = json.loads(meta["ternary"])
    assert sorted(ternary) == sorted(model.bitfx_report.converted)
    assert ternary["model.layers.0.self_attn.q_proj"]["weight_dtype"] == "bfloat16"
    loaded = bitfx.load(skeleton, path)
    assert loaded is skeleton
    assert sorted(n for n, m in skeleton.named_modules() if isinstance(m, bitfx.BitfxLinear)) == sorted(ternary)
    assert torch.equal(_logits(skeleton, ids), _logits(model, ids))


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    model, skeleton, ids = _quantized(models.tiny_gemma, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path / "g.safetensors"
    bitfx.save(model, path)
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads(f.metadata()["aliases"])
        stored = set(f.keys())
    assert len(aliases) == 1 and set(aliases.values()) <= stored and not set(aliases) & stored
    bitfx.load(skeleton, path)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(_logits(skeleton, ids), _logits(model, ids))


class _Net(nn.Module):
    def __init__(self, K=64, N=96):
        super().__init__()
        self.norm = nn.RMSNorm(K)
        self.up, self.gate, self.down = nn.Linear(K, N), nn.Linear(K, N), nn.Linear(N, K)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(self.gate(h) * self.up(h))


def test_a_meta_skeleton_gets_no_float_weights(tmp_path):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 5, 64)
    with torch.no_grad():
        bitfx.quantize(model, x)
    path = tmp_path / "n.safetensors"
    bitfx.save(model, path)
    with torch.device("meta"):
        skeleton = _Net()
    bitfx.load(skeleton, path)
    assert not any(t.is_meta for t in skeleton.state_dict().values())
    # (no float weight left registered on the layer; its ``weight`` reads the dequantized codes)
    assert isinstance(skeleton.up, bitfx.BitfxLinear) and not list(skeleton.up.parameters())
    assert "up.weight" not in skeleton.state_dict() and not skeleton.up.weight.is_meta
    with torch.no_grad():
        assert torch.equal(skeleton(x), model(x))


def _rewrite(path, out, *, metadata=None, tensors=None):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    ts.update(tensors or {})
    save_file(ts, str(out), metadata=meta)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 5, 64)
    with torch.no_grad():
        bitfx.quantize(model, x)
    path = tmp_path_factory.mktemp("ckpt") / "n.safetensors"
    bitfx.save(model, path)
    return path


def _refused(path, match, skeleton=None):
    skeleton = skeleton or _Net()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CheckpointError, match=match):
        bitfx.load(skeleton, path)
    # Nothing loaded half: the model is as it was.
    assert isinstance(skeleton.up, nn.Linear) and not isinstance(skeleton.up, bitfx.BitfxLinear)
    after = skeleton.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_another_format_version_is_refused(saved, tmp_path):
    _refused(_rewrite(saved, tmp_path / "v.safetensors", metadata={"format_version": "2", "bitfx_version": "9.0"}),
             r"format version '2' \(written by bitfx 9.0\); this bitfx .* reads version 1")


def test_another_layout_is_refused(saved, tmp_path):
    _refused(_rewrite(saved, tmp_path / "l.safetensors", metadata={"layout": "other-2bit"}), "packs its weights as 'other-2bit'")


def test_a_file_object_is_refused_with_a_clear_error(saved):
    """``torch.save`` takes a file object; a bitfx checkpoint is a safetensors file written and
    memory-mapped by its name, so ``bitfx.save`` and ``bitfx.load`` say so instead of failing
    inside safetensors."""
    import io

    model = _Net()
    with torch.no_grad():
        bitfx.quantize(model, torch.randn(2, 5, 64))
    with pytest.raises(TypeError, match=r"bitfx.save: path must be a file path \(str or os.PathLike\), got BytesIO"):
        bitfx.save(model, io.BytesIO())
    with open(saved, "rb") as f, pytest.raises(TypeError, match=r"bitfx.load: path must be a file path .* got "):
        bitfx.load(_Net(), f)


def test_a_file_that_is_not_a_bitfx_checkpoint_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(_Net().state_dict(), str(path))
    _refused(path, "is not a bitfx checkpoint")


def test_a_truncated_file_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    _refused(cut, "not a readable safetensors file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _refused(garbage, "not a readable safetensors file")


def test_shape_mismatch_is_refused(saved):
    _refused(saved, r"up: \[out, in\] = \[32, 64\] in the model, \[96, 64\] in the checkpoint", skeleton=_SmallNet())


class _SmallNet(_Net):
    def __init__(self):
        super().__init__(K=64, N=32)


def test_corrupted_codes_are_refused(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        packed = f.get_tensor("up.packed").clone()
    packed[3, 0] = 0xFF  # four codes 3: not a ternary value
    _refused(_rewrite(saved, tmp_path / "c.safetensors", tensors={"up.packed": packed}), r"up\.packed: .*code")


def test_missing_and_unexpected_tensors_are_refused(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys() if k != "up.w_scale"}
    ts["extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(ts, str(path), metadata=meta)
    _refused(path, r"(?s)missing from the checkpoint: up\.w_scale.*in the checkpoint but not the model: extra\.weight")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_round_trip_on_cuda(tmp_path):
    model, skeleton, ids = _quantized()
    model = model.cuda()
    path = tmp_path / "m.safetensors"
    bitfx.save(model, path)
    bitfx.load(skeleton, path, device="cuda")
    skeleton.cuda()  # the non-persistent buffers (rotary frequencies) follow
    assert all(t.is_cuda for t in skeleton.state_dict().values())
    assert torch.equal(_logits(skeleton, ids.cuda()), _logits(model, ids.cuda()))


def test_a_float_tensor_in_another_float_dtype_is_refused(saved, tmp_path):
    with safe_open(str(saved), framework="pt") as f:
        norm = f.get_tensor("norm.weight")
        bias = f.get_tensor("up.bias")
    _refused(_rewrite(saved, tmp_path / "d.safetensors", tensors={"norm.weight": norm.to(torch.bfloat16)}),
             r"norm\.weight: dtype bfloat16 in the checkpoint, float32 in the model")
    _refused(_rewrite(saved, tmp_path / "b.safetensors", tensors={"up.bias": bias.double()}),
             r"up\.bias: dtype float64 in the checkpoint, float32 in the model")
    # a skeleton built in another dtype than the one saved
    _refused(saved, r"norm\.weight: dtype float32 in the checkpoint, bfloat16 in the model",
             skeleton=_Net().to(torch.bfloat16))


def test_save_and_load_see_through_torch_compile(tmp_path):
    torch.manual_seed(0)
    model, x = _Net(), torch.randn(2, 5, 64)
    with torch.no_grad():
        bitfx.quantize(model, x)
        want = model(x)
    compiled = torch.compile(model, backend="bitfx")
    path = tmp_path / "c.safetensors"
    bitfx.save(compiled, path)
    with safe_open(str(path), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("_orig_mod")]
        assert "up" in json.loads(f.metadata()["ternary"])
    with torch.device("meta"):
        plain = _Net()
    assert bitfx.load(plain, path) is plain  # saved compiled, loaded plain
    with torch.no_grad():
        assert torch.equal(plain(x), want)
    with torch.device("meta"):
        wrapped = torch.compile(_Net(), backend="bitfx")
    assert bitfx.load(wrapped, path) is wrapped  # and into a compiled skeleton
    assert isinstance(wrapped._orig_mod.up, bitfx.BitfxLinear)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert torch.equal(wrapped(x), want)
