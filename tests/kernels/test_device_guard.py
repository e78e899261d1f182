"""Launches on the inputs' GPU: a Triton kernel runs on the *current* CUDA device, whatever
device its tensors are on, so a model spread over GPUs (``device_map``: layers on ``cuda:1``
called while ``cuda:0`` is current) would launch on the wrong one. The ops' CUDA
implementations, the weight-packing launchers, the cached launcher and the eager layer make the
inputs' device current first (:func:`bitfx.kernels._utils.on_input_device`).

The logic is checked on any machine with fake CUDA tensors (no GPU needed); the launch itself
on a machine with two GPUs.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from bitfx.kernels import _utils


def _fake_cuda(index: int) -> torch.Tensor:
    """A fake tensor on ``cuda:index``, whether or not this machine has that GPU: on a machine
    with CUDA, FakeTensor initializes a context on the device it names (``init_gpu_context``),
    which fails for an index beyond the GPUs there, so that step is skipped here."""
    skip = mock.patch.object(fake_tensor, "init_gpu_context", lambda device: None) \
        if hasattr(fake_tensor, "init_gpu_context") else contextlib.nullcontext()
    with skip, FakeTensorMode():
        return torch.empty(4, device=f"cuda:{index}")


@pytest.fixture
def devices(monkeypatch):
    """The current device (starts at 0) and the devices made current, without a GPU."""
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(index):
        index = index.index if isinstance(index, torch.device) else index
        before, state["current"] = state["current"], index
        state["entered"].append(index)
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(_utils, "current_cuda_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_the_first_cuda_tensor_names_the_device():
    a, b = _fake_cuda(1), _fake_cuda(0)
    assert _utils.cuda_index((a, b)) == 1
    assert _utils.cuda_index((None, 3, [b, a])) == 0  # a list's first tensor
    assert _utils.cuda_index((torch.zeros(2), a)) == -1  # the first tensor is on the CPU: no guard
    assert _utils.cuda_index((None, 2.0, [])) == -1


def test_a_call_runs_on_its_inputs_device(devices):
    seen = []

    @_utils.on_input_device
    def op(x, *rest):
        seen.append(devices["current"])
        return x

    op(_fake_cuda(1), 2)
    assert seen == [1] and devices["entered"] == [1]  # cuda:1 made current for the call ...
    assert devices["current"] == 0  # ... and cuda:0 current again after it
    op(_fake_cuda(0))
    op(torch.zeros(2))
    assert seen == [1, 0, 0] and devices["entered"] == [1]  # the same device, or the CPU: no switch


def test_the_ops_cuda_implementations_are_guarded():
    """Every ``"cuda"`` registration goes through the guard (the registered callable is the
    wrapper, whose ``__wrapped__`` is the implementation); a ``"reference"`` one through the
    wrapper that makes its outputs contiguous, not the guard."""
    from bitfx.ops import library

    registered = []
    real_impl = library.LIB.impl
    try:
        library.LIB.impl = lambda name, fn, key: registered.append((name, fn, key))
        impl = lambda x: x  # noqa: E731
        library.register("act_quant", "cuda")(impl)
        library.register("act_quant", "reference")(impl)
    finally:
        library.LIB.impl = real_impl
    (_, cuda_fn, cuda_key), (_, ref_fn, ref_key) = registered
    assert cuda_key == "CUDA" and cuda_fn.__wrapped__ is impl and ref_key == "CompositeExplicitAutograd"
    assert ref_fn is not cuda_fn and ref_fn.__wrapped__ is impl


def test_the_cached_launcher_launches_on_the_tensors_device(devices, monkeypatch):
    """:class:`bitfx.kernels._launch.Launcher` (here on its plain ``kernel[grid]`` path, with a
    stand-in kernel): a launch, and a bound launch, run with the first tensor's device current."""
    from bitfx.kernels import _launch

    monkeypatch.setattr(_launch, "current_cuda_device", lambda: devices["current"])
    launched = []

    class Kernel:
        arg_names = ("x", "n", "BLOCK")
        __name__ = "stand_in"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(devices["current"])

    launcher = _launch.Launcher(Kernel())
    launcher._direct = False  # the path every launch takes in the interpreter or under a launch hook
    launcher((1,), (_fake_cuda(1), 8), {"BLOCK": 16})
    launcher((1,), (_fake_cuda(0), 8), {"BLOCK": 16})
    again = launcher.bind((1,), (_fake_cuda(1), 8), {"BLOCK": 16})
    again(_fake_cuda(1), 8)
    assert launched == [1, 0, 1, 1] and devices["current"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layers_on_the_second_gpu_while_the_first_is_current():
    """An eager ``BitfxLinear`` and the ops on ``cuda:1`` with ``cuda:0`` current: the results
    equal the same calls on ``cuda:0`` bit for bit, and ``cuda:0`` stays current."""
    from bitfx.modules import BitfxLinear
    from tests.helpers import ops_forward

    torch.cuda.set_device(0)
    torch.manual_seed(0)
    layer0 = BitfxLinear.from_linear(torch.nn.Linear(256, 192, device="cuda:0", dtype=torch.bfloat16))
    layer1 = BitfxLinear.from_linear(torch.nn.Linear(256, 192, device="cuda:0", dtype=torch.bfloat16)).to("cuda:1")
    for name in ("packed", "w_scale", "bias"):
        getattr(layer1, name).copy_(getattr(layer0, name).to("cuda:1"))
    with torch.no_grad():
        for rows in (1, 7, 300):
            x0 = torch.randn(rows, 256, device="cuda:0", dtype=torch.bfloat16)
            x1 = x0.to("cuda:1")
            for _ in range(2):  # the first call makes the launch plan, the second reuses it
                got = layer1(x1)
                assert got.device == torch.device("cuda:1")
                assert torch.equal(got.cpu(), layer0(x0).cpu()), rows
            assert torch.equal(ops_forward(layer1, x1).cpu(), ops_forward(layer0, x0).cpu())
            w = torch.randn(64, 256, device="cuda:1")
            p1, s1 = torch.ops.bitfx.weight_quant(w, False)
            p0, s0 = torch.ops.bitfx.weight_quant(w.to("cuda:0"), False)
            assert torch.equal(p1.cpu(), p0.cpu()) and torch.equal(s1.cpu(), s0.cpu())
    assert torch.cuda.current_device() == 0
