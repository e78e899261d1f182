"""Fine-tuning a float model into a BitNet b1.58 one (ternary weights, int8 activations):
quantization-aware training that starts from the model's float weights, through the ``bitfx``
backend, optionally distilled from the frozen float model.

::

    result = bitfx.finetune(model, batches, steps=300, lr=1e-3, alpha=0.5, temperature=2.0)
    bitfx.quantize(result.model, example_ids)          # then: packed 2-bit weights

The loss of a step, over the n predicted tokens (targets ``y`` other than ``ignore_index``),
with ``z_s`` the student's logits (the model being fine-tuned, compiled with the backend),
``z_t`` the teacher's (the float model, frozen), ``T`` the temperature and ``alpha`` the
distillation weight::

    ce   = (1/n) Σ_tokens −log softmax(z_s)[y]
    p_t  = softmax(z_t / T),  p_s = softmax(z_s / T)
    kd   = T² · (1/n) Σ_tokens Σ_v p_t[v] · (log p_t[v] − log p_s[v])       KL(teacher ‖ student)
    loss = (1 − alpha) · ce + alpha · kd

The factor ``T²`` keeps the distillation gradient's size independent of ``T`` (Hinton et al.,
2015, "Distilling the Knowledge in a Neural Network"); ``alpha = 0`` (the default) is plain
continued training with the cross entropy, and needs no teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitfx.config import BitfxConfig
from bitfx.explain import _compile_options

__all__ = ["finetune", "FinetuneResult", "distillation_loss", "load_float_model"]


def distillation_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], targets: Tensor, *,
                      alpha: float = 0.0, temperature: float = 1.0,
                      ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, kd)`` of the module docstring's formula for logits ``[..., V]`` and targets
    ``[...]``; ``kd`` is zero when ``teacher_logits`` is None (then ``alpha`` must be 0). The
    sums run in fp32 whatever the logits' dtype."""
    _check_weights(alpha, temperature)
    if student_logits.shape[:-1] != targets.shape:
        raise ValueError(f"bitfx.distillation_loss: logits {tuple(student_logits.shape)} do not match targets "
                         f"{tuple(targets.shape)} (logits are [..., vocab], targets [...])")
    V = student_logits.shape[-1]
    zs = student_logits.float().reshape(-1, V)
    y = targets.reshape(-1)
    ce = F.cross_entropy(zs, y, ignore_index=ignore_index)
    if teacher_logits is None:
        if alpha != 0:
            raise ValueError(f"bitfx.distillation_loss: alpha={alpha} weighs a distillation term, but no teacher "
                             f"logits were given")
        kd = zs.new_zeros(())
        return ce, ce, kd
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"bitfx.distillation_loss: teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape (the same vocabulary and tokens are needed)")
    keep = y != ignore_index
    zt = teacher_logits.detach().float().reshape(-1, V)[keep]
    log_ps = F.log_softmax(zs[keep] / temperature, -1)
    log_pt = F.log_softmax(zt / temperature, -1)
    per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kd = temperature ** 2 * per_token.sum() / keep.sum().clamp(min=1)
    return (1 - alpha) * ce + alpha * kd, ce, kd


def _check_weights(alpha: float, temperature: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"bitfx.finetune: alpha (the distillation weight) must be a number in [0, 1], got {alpha!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature > 0)):
        raise ValueError(f"bitfx.finetune: temperature must be a finite number > 0, got {temperature!r}")


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns: ``model`` (trained in place: its float weights are the
    ternary model's latent weights; convert it with :func:`bitfx.quantize`), ``compiled`` (the
    model under the backend, ternary in training and in inference), and the loss, its cross
    entropy and its distillation term at each step."""

    model: nn.Module
    compiled: Callable[..., Any]
    loss: list[float]
    ce: list[float]
    kd: list[float]


def _logits(out: Any) -> Tensor:
    """A model's logits: the output itself, or its ``.logits`` (transformers' outputs)."""
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"bitfx.finetune: the model must return logits [batch, seq, vocab] or an output with "
                        f".logits, got {type(out).__name__}")
    return logits


def finetune(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    *,
    lr: Union[float, Callable[[int], float]] = 1e-3,
    weight_decay: float = 0.0,
    alpha: float = 0.0,
    temperature: float = 1.0,
    teacher: Optional[nn.Module] = None,
    config: Optional[BitfxConfig] = None,
    filter_fn: Optional[Callable[[Optional[nn.Module], str], bool]] = None,
    callback: Optional[Callable[[int, dict[str, float], Callable[..., Any]], None]] = None,
) -> FinetuneResult:
    """Train ``model``, a float model, as BitNet b1.58 for ``steps`` steps of AdamW, starting from
    its own weights: ``torch.compile(model, backend="bitfx", options={"config": config,
    "filter_fn": filter_fn})`` runs each step, so every linear the backend converts (all but the
    output head by default) computes with ternary weights and int8 activations, and the
    straight-through gradient updates the float weights underneath.

    ``batches`` yields ``(input_ids, targets)`` pairs, ``[B, S]`` each (targets equal to
    ``ignore_index`` -100 are skipped); ``lr`` is a float or a function of the step (1-based).
    ``alpha > 0`` mixes in the distillation term (the module docstring's formula) from
    ``teacher`` (run as given, under ``torch.no_grad()``: put it in eval mode; default: a copy of
    ``model`` taken before the first step, in eval mode). ``callback(step, {"loss", "ce", "kd"}, compiled)`` runs after each
    step (a progress bar, held-out evaluation under ``torch.no_grad()``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bitfx.finetune: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"bitfx.finetune: steps must be a positive int, got {steps!r}")
    _check_weights(alpha, temperature)
    if teacher is not None and alpha == 0:
        raise ValueError("bitfx.finetune: a teacher was given but alpha=0 gives its term no weight; pass alpha > 0")
    from bitfx.modules import BitfxLinear

    converted = [n for n, m in model.named_modules() if isinstance(m, BitfxLinear)]
    if converted:
        raise ValueError(f"bitfx.finetune: the model is already converted by bitfx.quantize ({converted[0]} and "
                         f"{len(converted) - 1} more hold frozen packed weights); fine-tune the float model instead")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not all(p.is_floating_point() for p in params):
        raise ValueError("bitfx.finetune: the model has no trainable float parameters to start from")
    schedule = lr if callable(lr) else (lambda step: lr)

    if alpha > 0 and teacher is None:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    options: dict[str, Any] = {"config": config or BitfxConfig()}
    if filter_fn is not None:
        options["filter_fn"] = filter_fn
    # Its own recompile region where torch has one: compiles of the same class elsewhere in the
    # process do not count towards Dynamo's limit, past which the model would run uncompiled.
    compiled = torch.compile(model, backend="bitfx", options=options, **_compile_options())
    opt = torch.optim.AdamW(params, lr=schedule(1), weight_decay=weight_decay)
    model.train()
    result = FinetuneResult(model, compiled, [], [], [])
    it = iter(batches)
    for step in range(1, steps + 1):
        try:
            x, y = next(it)
        except StopIteration:
            raise ValueError(f"bitfx.finetune: batches ran out after {step - 1} of {steps} steps") from None
        for group in opt.param_groups:
            group["lr"] = schedule(step)
        zt = None
        if teacher is not None:
            with torch.no_grad():
                zt = _logits(teacher(x))
        loss, ce, kd = distillation_loss(_logits(compiled(x)), zt, y, alpha=alpha, temperature=temperature)
        if step == 1 and not _through_compiled_graph(loss):
            if loss.grad_fn is None:
                why = ("the loss has no autograd graph" + ("" if torch.is_grad_enabled() else
                       " (grad mode is off here: call bitfx.finetune outside torch.no_grad())"))
            else:
                why = ("no compiled graph is behind the loss: Dynamo skips a frame it cannot trace or whose "
                       "recompile limit is reached (TORCH_LOGS=recompiles,graph_breaks says which)")
            raise RuntimeError(f"bitfx.finetune: the model ran uncompiled, so it would train in floating point, "
                               f"not as ternary; {why}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats = {"loss": loss.item(), "ce": ce.item(), "kd": kd.item()}
        for key, values in (("loss", result.loss), ("ce", result.ce), ("kd", result.kd)):
            values.append(stats[key])
        if callback is not None:
            callback(step, stats, compiled)
    return result


def _through_compiled_graph(loss: torch.Tensor) -> bool:
    """Whether ``loss``'s autograd graph passes through a graph ``torch.compile`` compiled (its
    backward node is AOTAutograd's ``CompiledFunctionBackward``)."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "CompiledFunction" in type(fn).__name__:
            return True
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def load_float_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal language model from a local checkpoint directory (``config.json``
    and its weights), in ``dtype``: the float model to fine-tune. Needs ``transformers``."""
    import os

    if not os.path.isdir(path):
        raise FileNotFoundError(f"bitfx.load_float_model: {path!r} is not a directory (a transformers checkpoint "
                                f"directory holds config.json and the weights)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"bitfx.load_float_model: {path!r} has no config.json: not a transformers checkpoint "
                                f"directory")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("bitfx.load_float_model: loading a transformers checkpoint needs the transformers "
                          "package (pip install transformers)") from e
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
