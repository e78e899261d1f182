"""Names of modules in a traced graph.

Fallback naming from Dynamo's ``nn_module_stack`` strings: used only for graphs with no model
at hand (the naming by identity lives in :mod:`bitfx.passes.naming` too, below).
"""

from __future__ import annotations

import re

from torch import fx

__all__ = ["module_fqn", "module_type_name"]


def module_fqn(node: fx.Node) -> str | None:
    """The fully qualified name of the innermost module a node was traced in, e.g.
    ``"model.layers.0.self_attn.q_proj"`` (Dynamo writes ``L['self'].model.layers[0]...``),
    relative to the compiled model (see :func:`_clean_fqn`)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return _clean_fqn(path)


def module_type_name(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    t = list(stack.values())[-1][1]  # a class (Dynamo) or its qualified name (export)
    return t.__name__ if isinstance(t, type) else str(t).rsplit(".", 1)[-1]


_ROOT = re.compile(r"""^[LG]\[['"]([^'"]*)['"]\]""")


_GETATTR = re.compile(r"""getattr\(([^(),]+),\s*['"]([^'"]+)['"]\)""")


def _clean_fqn(path: str) -> str:
    path = str(path)
    while True:  # getattr(L['self'].layers, '0') -> L['self'].layers.0
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    # Names are relative to the root object (the compiled module, L['self'], or a module the
    # compiled function calls, L['model'] / G['model']); a root that is itself the module in
    # question (a free-standing nn.Linear ``a``: "G['a']") is named by its variable.
    m = _ROOT.match(path)
    if m is not None:
        path = m.group(1) if m.end() == len(path) else path[m.end():]
    path = re.sub(r"""\[['"]([^'"]+)['"]\]""", r".\1", path)  # ['name'] -> .name
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # [0] -> .0
    path = path.replace("._modules.", ".")
    return path.strip(".")
