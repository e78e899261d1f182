"""bitfx's sources in torch.compile's cache keys (:mod:`bitfx.cache_key`): a warm cache serves a
training graph again only to the same bitfx, never a backward traced from other formulas."""

from __future__ import annotations

import pytest
import torch

import bitfx  # noqa: F401  (the backend)
from bitfx import cache_key
from tests import models

pytestmark = pytest.mark.skipif(cache_key.KeyedPass is None, reason="this torch has no custom pass cache keys")


class _UserPass(cache_key._Base if cache_key._Base is not None else object):
    def __init__(self, ident="user-pass-1"):
        self.ident, self.calls = ident, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.ident


def test_uuid_follows_the_sources_and_the_inner_pass(monkeypatch):
    base = cache_key.KeyedPass().uuid()
    assert base == cache_key.KeyedPass().uuid()  # deterministic
    assert cache_key.KeyedPass(_UserPass("a")).uuid() != cache_key.KeyedPass(_UserPass("b")).uuid()
    assert cache_key.KeyedPass(lambda g: None).uuid() is None  # an unkeyable pass: no caching
    monkeypatch.setenv("BITFX_CONCAT_GRADS", "0")  # the post-grad rewrite off: another graph
    off = cache_key.KeyedPass().uuid()
    assert off != base
    monkeypatch.setenv("BITFX_CONCAT_GRADS", "1")
    assert cache_key.KeyedPass().uuid() == base  # on is the default
    monkeypatch.setattr(cache_key, "source_hash", lambda: "another bitfx")
    assert cache_key.KeyedPass().uuid() not in (base, off)


def test_source_hash_covers_the_backward_formulas():
    import hashlib
    import os

    import bitfx.ops.training

    before = cache_key.source_hash()
    path = os.path.abspath(bitfx.ops.training.__file__)
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() not in before  # a hash of all files, not of one
    cache_key.source_hash.cache_clear()
    assert cache_key.source_hash() == before


def _train_step(model, ids, options=None):
    loss = torch.compile(model, backend="bitfx", options=options or {})(ids, labels=ids).loss
    loss.backward()
    return loss


def test_user_post_grad_pass_still_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cold cache: the graphs compile
    model, ids = models.tiny_llama(dtype=torch.float32)
    model.train()
    user = _UserPass()
    torch._dynamo.reset()
    try:
        _train_step(model, ids, {"post_grad_custom_post_pass": user})
    finally:
        torch._dynamo.reset()
    assert user.calls >= 2  # the forward and the backward graph


def test_a_changed_bitfx_misses_the_warm_cache(monkeypatch, tmp_path):
    """Same model, same graph, warm caches: the same sources hit AOTAutograd's cache, other sources
    miss it (and compile their own backward)."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    # torch's config modules are patched through their own patch(): a plain setattr breaks the
    # aliases among their entries for whatever runs after this test.
    patches = [inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True)]

    def run() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        model, ids = models.tiny_llama(dtype=torch.float32)
        model.train()
        _train_step(model, ids)
        return counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"]

    for p in patches:
        p.__enter__()
    try:
        first = run()
        assert first[1] >= 1 and first[0] == 0, first  # a cold cache: compiled and stored
        again = run()
        assert again[0] >= 1 and again[1] == 0, again  # the same bitfx: served from the cache
        monkeypatch.setattr(cache_key, "source_hash", lambda: "a bitfx with other formulas")
        other = run()
        assert other[1] >= 1 and other[0] == 0, other  # other sources: not served the old graphs
    finally:
        for p in reversed(patches):
            p.__exit__(None, None, None)
        torch._dynamo.reset()
