"""Names of the modules and parameters a traced graph uses.

By identity: :class:`Naming` maps each weight node of a graph to the very tensor it stands for
(Dynamo's placeholders carry the real parameter; ``get_attr`` nodes name an attribute of the
graph module; a subgraph's placeholders stand for the arguments of the node that calls it)
and that tensor to its names in the model, from ``model.named_parameters()``. Tied weights have
several names; a weight of no known model has none.

By text, as a fallback for graphs with no model at hand: Dynamo's ``nn_module_stack`` strings
(:func:`module_fqn`), whose form changes between releases of torch and of the model code
(``L['self'].model.layers[0]``, ``L['args'][0].model.layers.0``, ``getattr(..., '0')``...).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn

from bitfx.passes.fx_utils import is_cast

__all__ = ["Naming", "module_fqn", "module_type_name"]


class Naming:
    """Names of a graph's weights and modules, by tensor identity.

    ``roots``: ``(prefix, module)`` or ``(prefix, module, label)``, the models the graph's
    parameters belong to (the compiled model: prefix ``""``); names are relative to the root,
    and a root that is itself the module named (a free-standing ``nn.Linear`` a function
    calls) is called by its ``label``, the variable that held it. ``example_inputs``: the tensors the graph was called with
    (the backend's ``example_inputs``), for placeholders that carry no tensor of their own.
    ``links``: for a subgraph, its placeholders -> the nodes of the outer graph they stand for.
    """

    def __init__(self, roots: Iterable[tuple] = (), example_inputs: Optional[list] = None):
        roots = [tuple(r) + ("",) * (3 - len(r)) for r in roots]
        self.roots = [(p, m) for p, m, _ in roots if isinstance(m, nn.Module)]
        self.example_inputs = example_inputs
        self.links: dict[fx.Node, fx.Node] = {}
        self._params: dict[int, list[str]] = {}
        self._owners: dict[int, list[tuple[nn.Module, str, str]]] = {}  # (module, fqn, attribute)
        for prefix, root, label in roots:
            if not isinstance(root, nn.Module):
                continue
            for mod_name, mod in root.named_modules(remove_duplicate=False):
                full = _join(prefix, mod_name) or label
                for p_name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                    names = self._params.setdefault(id(p), [])
                    name = _join(full, p_name)
                    if name not in names:
                        names.append(name)
                    owners = self._owners.setdefault(id(p), [])
                    if all(o[0] is not mod or o[2] != p_name for o in owners):
                        owners.append((mod, full, p_name))

    # -------------------------------------------------------------- tensors behind nodes

    def link_subgraph(self, call: fx.Node, body: fx.GraphModule, first_arg: int = 1) -> None:
        """Tie ``body``'s placeholders to the arguments ``call.args[first_arg:]`` of the outer node."""
        holders = [n for n in body.graph.nodes if n.op == "placeholder"]
        for ph, outer in zip(holders, call.args[first_arg:]):
            if isinstance(outer, fx.Node):
                self.links[ph] = outer

    def tensor(self, node: Any) -> Optional[torch.Tensor]:
        """The real tensor a (weight) node stands for, through casts, or None."""
        for _ in range(32):
            if not isinstance(node, fx.Node):
                return None
            while is_cast(node):
                node = node.args[0]
            if node in self.links:
                node = self.links[node]
                continue
            if node.op == "placeholder":
                ga = node.meta.get("grapharg")
                t = getattr(ga, "example", None) if ga is not None else None
                if isinstance(t, torch.Tensor):
                    return t
                if self.example_inputs is not None:
                    holders = [n for n in node.graph.nodes if n.op == "placeholder"]
                    i = holders.index(node)
                    if i < len(self.example_inputs) and isinstance(self.example_inputs[i], torch.Tensor):
                        return self.example_inputs[i]
                return None
            if node.op == "get_attr":
                gm = node.graph.owning_module
                obj: Any = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part, None)
                return obj if isinstance(obj, torch.Tensor) else None
            return None
        return None

    # -------------------------------------------------------------- names

    def param_names(self, node: Any) -> list[str]:
        """Every name the tensor behind ``node`` goes by in the model (several when tied)."""
        t = self.tensor(node)
        return list(self._params.get(id(t), [])) if t is not None else []

    def owner(self, node: Any) -> tuple[Optional[nn.Module], Optional[str]]:
        """``(module, fqn)`` of the (first) module that holds the tensor behind ``node``."""
        t = self.tensor(node)
        if t is None or id(t) not in self._owners:
            return None, None
        mod, fqn, _ = self._owners[id(t)][0]
        return mod, fqn

    def weight_name(self, weight: Any, call: Optional[fx.Node] = None) -> tuple[Optional[nn.Module], Optional[str]]:
        """``(module, name)`` for a linear call whose weight is ``weight``: the module holding
        the parameter and its fqn when the parameter is that module's ``weight`` (an
        ``nn.Linear``), else the parameter's own fqn. A tied weight has several holders: the
        one the call was traced in (``nn_module_stack``), else an ``nn.Linear``, else the first.
        Without a model: ``(None, the nn_module_stack name of call)``."""
        t = self.tensor(weight)
        owners = self._owners.get(id(t), []) if t is not None else []
        if not owners:
            return None, (module_fqn(call) if call is not None else None)
        traced = module_fqn(call) if call is not None and len(owners) > 1 else None
        best = (next((o for o in owners if traced is not None and o[1] == traced), None)
                or next((o for o in owners if isinstance(o[0], nn.Linear)), None) or owners[0])
        mod, fqn, leaf = best
        return mod, fqn if leaf in ("weight", "packed") else _join(fqn, leaf)

    def output_heads(self) -> set[int]:
        """ids of the output-embedding weights the roots declare (``get_output_embeddings()``)."""
        out = set()
        for _, root in self.roots:
            get = getattr(root, "get_output_embeddings", None)
            if callable(get):
                try:
                    head = get()
                except (AttributeError, NotImplementedError, TypeError):
                    head = None
                # the registered tensor (a converted head's ``weight`` is a dequantized copy)
                w = _registered(head, "weight")
                if isinstance(w, torch.Tensor):
                    out.add(id(w))
        return out


def _registered(module, name: str):
    """``module``'s parameter or buffer ``name``, or None (nothing computed by a property)."""
    if not isinstance(module, nn.Module):
        return None
    return module._parameters.get(name, module._buffers.get(name))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


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


# The root object: a local or global, and any subscripts of it (``L['args'][0]``).
_ROOT = re.compile(r"""^[LG]\[['"]([^'"]*)['"]\]((?:\[[^\]]*\])*)""")


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
        path = m.group(1) + m.group(2) if m.end() == len(path) else path[m.end():]
    path = re.sub(r"""\[['"]([^'"]+)['"]\]""", r".\1", path)  # ['name'] -> .name
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # [0] -> .0
    path = path.replace("._modules.", ".")
    return path.strip(".")
