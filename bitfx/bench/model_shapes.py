"""The model shapes the benchmarks measure, defined once: transformers configs of Llama-3.2-1B,
Llama-3-8B, BitNet b1.58 2B4T and a 350M Llama (random weights: the shapes are what matter),
a tiny twin of each for ``--quick`` and CPU runs, and the linear shapes of the site benchmark."""

from __future__ import annotations

from typing import Any

import torch

# name -> (architecture, config fields). Only fields present in transformers' LlamaConfig and
# BitNetConfig from 5.17 on; rope theta is set separately (its field was renamed across versions).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", dict(  # Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=131072, rope_theta=500000.0,
    )),
    "llama-8b": ("llama", dict(  # Llama-3-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=500000.0,
    )),
    "bitnet-2b4t": ("bitnet", dict(  # BitNet b1.58 2B4T, in transformers' BitNet architecture
        vocab_size=128256, hidden_size=2560, intermediate_size=6912, num_hidden_layers=30,
        num_attention_heads=20, num_key_value_heads=5, hidden_act="relu2", tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=500000.0,
    )),
    "llama-350m": ("llama", dict(  # a Llama-3 vocabulary on a 350M body (hidden 1024, 12 layers)
        vocab_size=128256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=500000.0,
    )),
}

# The same architectures at a size that compiles and runs in seconds on CPU.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-1b": ("llama", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
    )),
    "llama-8b": ("llama", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
    )),
    "bitnet-2b4t": ("bitnet", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="relu2", tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
        bos_token_id=1, eos_token_id=2,  # inside the tiny vocabulary (BitNet's defaults are Llama-3's ids)
    )),
    "llama-350m": ("llama", dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
        rms_norm_eps=1e-5, max_position_embeddings=1024, rope_theta=500000.0,
    )),
}

_HIDDEN_8B, _MLP_8B = MODELS["llama-8b"][1]["hidden_size"], MODELS["llama-8b"][1]["intermediate_size"]
SITE_SHAPES: list[tuple[int, int]] = [
    (8192, 8192),  # (K, N): Llama-3-70B's hidden size, square
    (_HIDDEN_8B, _HIDDEN_8B),  # Llama-3-8B: the attention projections
    (_HIDDEN_8B, _MLP_8B),  # its MLP gate and up
    (_MLP_8B, _HIDDEN_8B),  # its MLP down
]


def set_rope_theta(config, theta: float) -> None:
    """Set the rotary base on a config of either generation of the field: transformers 5.x keeps
    it in ``rope_parameters`` (a dict), older configs in ``rope_theta``. The speed does not
    depend on it; it is set so that the configs are the published ones."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        config.rope_parameters = {**rp, "rope_theta": theta}
    else:
        config.rope_theta = theta


def make_config(name: str, tiny: bool = False, **fields):
    """The transformers config of ``name`` (a key of :data:`MODELS`), or of its tiny twin;
    ``fields`` replace the table's (e.g. ``use_cache=False``)."""
    from transformers import BitNetConfig, LlamaConfig

    table = TINY if tiny else MODELS
    if name not in table:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    arch, base = table[name]
    fields = {**base, **fields}
    theta = fields.pop("rope_theta")
    config = (LlamaConfig if arch == "llama" else BitNetConfig)(**fields)
    set_rope_theta(config, theta)
    return config


def model_class(config):
    from transformers import BitNetForCausalLM, LlamaForCausalLM

    return BitNetForCausalLM if config.model_type == "bitnet" else LlamaForCausalLM


def build_model(config, device: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Random-weight model of ``config`` on ``device`` in ``dtype``, eval mode, no gradients.
    Parameters are allocated directly on the device and in ``dtype`` (the 8B model never
    exists in fp32)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
