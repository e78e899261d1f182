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



# ---------------------------------------------------------------- malformed metadata


def _refused(path, match):
    model = _Net()
    before = _state(model)
    with pytest.raises(CheckpointError, match=match) as e:
        bitfx.load(model, path)
    _unchanged(model, before)
    return str(e.value)


def _meta(saved, tmp_path, **metadata):
    from tests.test_checkpoint import _rewrite

    return _rewrite(saved[0], tmp_path / "meta.safetensors", metadata=metadata)


def _ternary(saved):
    import json

    from safetensors import safe_open

    with safe_open(str(saved[0]), framework="pt") as f:
        return json.loads(f.metadata()["ternary"])


def test_deeply_nested_json_is_refused(saved, tmp_path):
    _refused(_meta(saved, tmp_path, ternary="[" * 200_000 + "]" * 200_000), r"ternary: not valid JSON")
    _refused(_meta(saved, tmp_path, aliases="{"), r"aliases: not valid JSON")


@pytest.mark.parametrize("field,value,match", [
    ("ternary", "[]", r"ternary: must be a JSON object \{name: fields\}, got list"),
    ("ternary", '"up"', r"ternary: must be a JSON object .* got str"),
    ("aliases", "[1, 2]", r"aliases: must be a JSON object .* got list"),
    ("aliases", '{"a": 3}', r"aliases\['a'\]: a name must be a string, got 3"),
    ("aliases", '{"up.bias": "up.bias"}', r"aliases\['up.bias'\]: an alias of itself"),
])
def test_metadata_of_the_wrong_shape_is_refused(saved, tmp_path, field, value, match):
    _refused(_meta(saved, tmp_path, **{field: value}), match)


@pytest.mark.parametrize("change,match", [
    ({"up": 5}, r"ternary\['up'\]: must be a JSON object of fields, got int"),
    ({"up": {"in_features": 64}}, r"ternary\['up'\]: fields missing: out_features, bias, per_channel, weight_dtype"),
    ({"up.extra": None}, r"ternary\['up.extra'\]: must be a JSON object"),
    ({"": {}}, r"ternary: a name must hold 1 to 1024 characters, got 0"),
])
def test_a_malformed_ternary_entry_is_refused(saved, tmp_path, change, match):
    import json

    ternary = _ternary(saved)
    ternary.update(change)
    _refused(_meta(saved, tmp_path, ternary=json.dumps(ternary)), match)


@pytest.mark.parametrize("field,value,match", [
    ("weight_dtype", "nn", r"weight_dtype must be one of float32, float16, bfloat16, float64, got \"nn\""),
    ("weight_dtype", "int8", r"weight_dtype must be one of"),
    ("weight_dtype", ["float32"], r"weight_dtype must be one of"),
    ("in_features", "64", r"in_features must be an int in \[1, 2147483647\], got \"64\""),
    ("out_features", 96.0, r"out_features must be an int"),
    ("out_features", True, r"out_features must be an int"),
    ("bias", "yes", r"bias must be true or false, got \"yes\""),
    ("per_channel", 0, r"per_channel must be true or false, got 0"),
    ("terms", "x", r"terms must be an int in \[1, 64\], got \"x\""),
    ("terms", 10**9, r"terms must be an int in \[1, 64\]"),
    ("act_bits", 5, r"act_bits must be 8, 6 or 4, got 5"),
    ("act_bits", 8.0, r"act_bits must be 8, 6 or 4, got 8.0"),
    ("colour", "red", r"unknown fields: colour"),
])
def test_every_field_of_a_ternary_entry_is_type_checked(saved, tmp_path, field, value, match):
    import json

    ternary = _ternary(saved)
    ternary["up"][field] = value
    _refused(_meta(saved, tmp_path, ternary=json.dumps(ternary)), rf"ternary\['up'\]: .*{match}")


def test_a_huge_metadata_blob_gives_a_short_error(saved, tmp_path):
    import json

    ternary = _ternary(saved)
    ternary.update({f"layer{i}.proj": {"in_features": "x" * 50} for i in range(200_000)})
    text = _refused(_meta(saved, tmp_path, ternary=json.dumps(ternary)), r"malformed metadata")
    assert len(text) < 10_000 and "... and 199980 more" in text
    # and a long value is cut
    ternary = _ternary(saved)
    ternary["up"]["weight_dtype"] = "f" * 1_000_000
    text = _refused(_meta(saved, tmp_path, ternary=json.dumps(ternary)), r"weight_dtype must be one of")
    assert len(text) < 2_000
    text = _refused(_meta(saved, tmp_path, format_version="9" * 1_000_000, bitfx_version="v" * 1_000_000),
                    "format version")
    assert len(text) < 2_000


def test_a_checkpoint_that_lists_many_layers_the_model_lacks_gives_a_short_error(saved, tmp_path):
    import json

    ternary = _ternary(saved)
    spec = ternary["up"]
    ternary.update({f"layer{i}.proj": spec for i in range(200_000)})
    text = _refused(_meta(saved, tmp_path, ternary=json.dumps(ternary)), r"does not fit the model")
    assert len(text) < 10_000 and "more" in text


# ---------------------------------------------------------------- checksums


def _layout(path):
    """{tensor name: (first byte, end byte)} of each tensor's data in the file, from the safetensors header."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}


def test_checksums_are_the_crc32_of_the_bytes_in_the_file(saved):
    import json
    import zlib

    from safetensors import safe_open

    path = saved[0]
    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads(f.metadata()["checksums"])
    raw = path.read_bytes()
    layout = _layout(path)
    assert set(recorded) == set(layout)
    assert all(recorded[k] == f"crc32:{zlib.crc32(raw[b:e]):08x}" for k, (b, e) in layout.items())


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_flipped_bit_in_any_tensor_is_refused_naming_it(saved, tmp_path, where):
    path = saved[0]
    raw = path.read_bytes()
    layout = _layout(path)
    assert len(layout) == 13  # norm.weight; packed, w_scale, bias, ternary_format of up, gate, down
    for name, (b, e) in sorted(layout.items()):
        at, bit = (b, 0) if where == "first" else (e - 1, 7)  # the lowest bit; a float's sign bit
        bad = bytearray(raw)
        bad[at] ^= 1 << bit
        out = tmp_path / "flipped.safetensors"
        out.write_bytes(bytes(bad))
        _refused(out, rf"(?m)^  {name}: checksum crc32:[0-9a-f]{{8}}, the file records crc32:[0-9a-f]{{8}}: its data "
                      rf"changed after bitfx.save wrote it")


@pytest.mark.parametrize("name", ["norm.weight", "up.w_scale", "down.bias"])
@pytest.mark.parametrize("power", [64, -64])
def test_a_tensor_scaled_by_a_power_of_two_is_refused(saved, tmp_path, name, power):
    """Values that pass every other check (finite, positive scales): only the checksum sees them."""
    from safetensors import safe_open

    from tests.test_checkpoint import _rewrite

    with safe_open(str(saved[0]), framework="pt") as f:
        t = f.get_tensor(name)
    scaled = _rewrite(saved[0], tmp_path / "scaled.safetensors", tensors={name: t * 2.0**power})
    _refused(scaled, rf"{name}: checksum .* its data changed")


def test_a_tensor_without_a_checksum_is_refused(saved, tmp_path):
    import json

    from safetensors import safe_open

    from tests.test_checkpoint import _rewrite

    with safe_open(str(saved[0]), framework="pt") as f:
        sums = json.loads(f.metadata()["checksums"])
    del sums["up.bias"]
    _refused(_meta(saved, tmp_path, checksums=json.dumps(sums)), r"no checksum recorded for up\.bias")
    sums["up.bias"] = "md5:0"
    _refused(_rewrite(saved[0], tmp_path / "c.safetensors", metadata={"checksums": json.dumps(sums)}),
             r"checksums: not of the form 'crc32:<8 hex digits>' for 'up.bias'")
    _refused(_meta(saved, tmp_path, checksums="[]"), r"checksums: must be a JSON object")


def test_a_checkpoint_written_before_checksums_loads_with_a_warning(saved, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, x, want = saved
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "checksums"}
        ts = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(ts, str(old), metadata=meta)
    model = _Net()
    with pytest.warns(UserWarning, match=r"holds no checksums .* loaded without verification"):
        bitfx.load(model, old)
    with torch.no_grad():
        assert torch.equal(model(x), want)


# ---------------------------------------------------------------- non-persistent buffers of a meta skeleton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transformers_model_loaded_into_a_meta_skeleton_runs(tmp_path, dtype):
    """The README's recipe: the rotary embedding's inv_freq is in no state_dict; it was left on meta."""
    import warnings

    from transformers import LlamaForCausalLM

    from tests import models

    model, ids = models.tiny_llama(dtype=dtype)
    with torch.no_grad():
        bitfx.quantize(model, ids)
        want = model(ids).logits
    path = tmp_path / "llama.safetensors"
    bitfx.save(model, path)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(model.config).to(dtype)
    assert skeleton.model.rotary_emb.inv_freq.is_meta
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to warn about
        bitfx.load(skeleton, path)
    assert not [n for n, b in skeleton.named_buffers() if b.is_meta]
    rot, ref = skeleton.model.rotary_emb, model.model.rotary_emb
    assert torch.equal(rot.inv_freq, ref.inv_freq) and torch.equal(rot.original_inv_freq, ref.original_inv_freq)
    with torch.no_grad():
        assert torch.equal(skeleton.eval()(ids).logits, want)


class _Tabled(_Net):
    """A non-persistent buffer no constructor call from a config can make again."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_meta_buffers_bitfx_cannot_compute_are_named(tmp_path):
    torch.manual_seed(0)
    model, x = _Tabled(), torch.randn(2, 5, 64)
    with torch.no_grad():
        bitfx.quantize(model, x)
    path = tmp_path / "t.safetensors"
    bitfx.save(model, path)
    with torch.device("meta"):
        skeleton = _Tabled()
    with pytest.warns(UserWarning, match=r"bitfx.load: table \(non-persistent buffers: no checkpoint holds them\) "
                                         r"are still on the meta device"):
        bitfx.load(skeleton, path)
    assert skeleton.table.is_meta and not skeleton.up.packed.is_meta
