"""bitfx's own code in the keys of torch.compile's caches.

Inductor's FX graph cache and AOTAutograd's cache key a compiled graph on the graph that reaches
them and take a ``torch.ops.bitfx.*`` call in it as a fixed operator. But the training ops'
backward formulas are Python (:mod:`bitfx.ops.training`, :mod:`bitfx.ops.fp8`), traced into the backward graph
when it is compiled: a cache filled under one version of bitfx would hand the old backward to
another (seen: after the backward changed, a warm cache still ran the previous one).

The backend therefore compiles with a post-grad pass whose ``uuid()``, which both caches hash
into their keys, is a hash of bitfx's source files. The pass runs bitfx's own post-grad
rewrites (:mod:`bitfx.passes.post_grad`; ``BITFX_CONCAT_GRADS=0`` turns off the one there is).
A pass already in that slot (the user's, through ``options`` or Inductor's config) runs after
them, and its own uuid is folded in; one without a uuid makes the caches step aside, as torch
does for it.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Optional

__all__ = ["source_hash", "KeyedPass", "keyed"]

_SLOT = "post_grad_custom_post_pass"


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of every ``*.py`` file of the package (``bitfx`` and its subpackages,
    ``bitfx.passes``, ``bitfx.kernels``), by path relative to its package and content."""
    import bitfx
    import bitfx.kernels
    import bitfx.passes

    h = hashlib.sha256()
    for pkg in (bitfx, bitfx.passes, bitfx.kernels):
        folder = os.path.dirname(os.path.abspath(pkg.__file__))
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                    h.update(f"{pkg.__name__}/{rel}\0".encode())
                    with open(os.path.join(root, name), "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def _base():
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - a torch without custom pass keys
        return None
    return CustomGraphPass


def _passes(inner: Any) -> list:
    if not inner:
        return []
    return list(inner) if isinstance(inner, (list, tuple)) else [inner]


_Base = _base()


def _concat_grads() -> bool:
    """``BITFX_CONCAT_GRADS``: whether the post-grad pass rewrites stacked gradients (default on)."""
    from bitfx.modules import env_switch

    return env_switch("BITFX_CONCAT_GRADS", True)


if _Base is not None:

    class KeyedPass(_Base):
        """A post-grad pass that runs bitfx's post-grad rewrites, then ``inner`` (None, a pass,
        or a list of passes), and keys the caches on bitfx's sources and ``inner``'s uuids
        (the environment setting joins the key through the uuid)."""

        def __init__(self, inner: Any = None):
            self.inner = inner

        def __call__(self, graph) -> None:
            from bitfx.passes.post_grad import concat_gradients

            if _concat_grads():
                concat_gradients(graph)
            for p in _passes(self.inner):
                p(graph)

        def uuid(self) -> Optional[Any]:
            ids = []
            for p in _passes(self.inner):
                u = p.uuid() if isinstance(p, _Base) else None
                if u is None:  # a pass the caches cannot key: no caching, as torch does for it
                    return None
                ids.append(u)
            settings = (_concat_grads(),)
            return hashlib.sha256(repr(("bitfx", source_hash(), settings, ids)).encode()).hexdigest()

else:  # pragma: no cover
    KeyedPass = None  # type: ignore[assignment,misc]


def keyed(patches: dict) -> dict:
    """``patches`` (Inductor config patches) with bitfx's :class:`KeyedPass` in the post-grad
    slot, wrapping whatever pass the patches or Inductor's config put there."""
    if KeyedPass is None:  # pragma: no cover
        return patches
    import torch._inductor.config as inductor_config

    inner = patches[_SLOT] if _SLOT in patches else getattr(inductor_config, _SLOT, None)
    if isinstance(inner, KeyedPass):  # already keyed (a backend called from within another)
        return patches
    return {**patches, _SLOT: KeyedPass(inner)}
