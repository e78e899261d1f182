"""Input checks shared by the launchers."""

from __future__ import annotations

import functools
import os

import torch

from bitfx.layout import FLOAT_DTYPES  # noqa: F401  (re-exported for the launchers)


_ENV_DATA = getattr(os.environ, "_data", None)  # CPython on POSIX: the encoded mapping behind os.environ
_ENV_KEYS: dict = {}


def env(name: str) -> str | None:
    """``os.environ.get(name)`` without the mapping's per-call encoding (a launch reads a few
    settings; through ``os.environ.get`` each costs microseconds). Reads the live environment,
    so a change made through ``os.environ`` (``monkeypatch.setenv``) is seen at once."""
    if _ENV_DATA is None or os.name != "posix":
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_DATA.get(key)
    return None if value is None else os.fsdecode(value)


def current_cuda_device() -> int:
    """The current CUDA device's index (``torch.cuda.current_device()`` without its per-call
    initialization check: call it where a CUDA tensor exists)."""
    return torch._C._cuda_getDevice()


def cuda_index(args) -> int:
    """The device index of the first CUDA tensor among ``args`` (a tensor, or a list or tuple
    whose first item is one), -1 if there is none."""
    for a in args:
        if isinstance(a, (list, tuple)):
            a = a[0] if a else None
        if isinstance(a, torch.Tensor):
            return a.get_device() if a.is_cuda else -1
    return -1


def on_input_device(fn):
    """``fn`` run with the current CUDA device set to its inputs' (the first CUDA tensor among
    its positional arguments) where they differ. A Triton kernel launches on the current
    device, whatever device its tensors are on: a model spread over GPUs (``device_map``) calls
    layers on ``cuda:1`` while ``cuda:0`` is current, and the launch would read another GPU's
    addresses (an error at best). Costs a comparison where the devices agree."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        index = cuda_index(args)
        if index < 0 or index == current_cuda_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(index):
            return fn(*args, **kwargs)

    return run


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` costs microseconds a call in recent Triton)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch for this device: CUDA (not ROCm, not the interpreter),
    compute capability 9.0 or newer, and not turned off with ``BITFX_PDL=0``.

    A kernel launched with it may start while the kernel before it in the stream is still
    running; it must wait (``gdc_wait``) before it reads anything that kernel may have written.
    """
    if device.type != "cuda" or torch.version.hip is not None or interpreting():
        return False
    if env("BITFX_PDL") in ("0", ""):
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 in the interpreter (a nominal count, so that
    small test shapes exercise the launchers' split-K and few-rows choices)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env("TRITON_INTERPRET") not in (None, "", "0")


def check_device(name: str, *tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device that Triton can run on; returns that device."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"{name}: all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(
            f"{name}: the Triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"got a tensor on {device}"
        )
    return device


def check_dtype(name: str, what: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: {what} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def rows(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose last dimension is contiguous (copied if it is not)."""
    if t.dim() != 2:
        raise ValueError(f"{name}: {what} must be 2-D, got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t

