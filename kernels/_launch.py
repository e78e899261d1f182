"""A cached launcher for the Triton kernels: the compiled kernel is looked up once per
specialization and then launched directly, without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` binds every argument, computes its specialization and a
cache key, and checks the kernel's globals on every call: tens of microseconds of host time,
more than a decode-sized kernel runs on the GPU. :class:`Launcher` keeps the compiled kernel
per key and launches it through the compiled kernel's own launcher. The key is at least as
fine as Triton's specialization, so a cached kernel is only reused for arguments Triton would
have compiled it for:

* a tensor: its dtype and whether its address is 16-byte aligned;
* an int: whether it equals 1, is divisible by 16, and fits in int32 (Triton's ``i32``/``i64``);
* a float, bool or None: its type (None and constexprs are part of the code);
* every constexpr and launch option by value, and the current device.

The first call with a key, and every call while a Triton launch hook is installed (a profiler
such as proton) or in the interpreter, goes through ``kernel[grid]`` unchanged; the others
call the compiled kernel's launcher with no launch metadata and no hooks.

:meth:`Launcher.traced` launches through ``torch.library.wrap_triton`` instead, for the
``triton_op`` forms of the ops (:mod:`bitfx.ops.inductor`): traced by ``torch.compile``, the
kernel becomes part of Inductor's generated code, which launches it itself.
"""

from __future__ import annotations

import torch

from bitfx.kernels._utils import current_cuda_device, interpreting

__all__ = ["Launcher"]


def _triton_version() -> tuple[int, ...]:
    import triton

    out = []
    for part in triton.__version__.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


_Tensor = torch.Tensor


def _arg_key(a):
    """What Triton specializes on in one runtime argument (module docstring)."""
    if isinstance(a, _Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    if a is None or isinstance(a, (bool, float)):  # bool before int: True is an int too
        return type(a)
    if isinstance(a, int):
        return (a == 1, not a & 15, -2147483648 <= a < 2147483648)
    raise TypeError(f"bitfx launcher: unsupported kernel argument of type {type(a).__name__}")


_RUNTIME = []


def _hooks_set() -> bool:
    """Whether a launch hook is installed (Triton 3.4+ keeps an always-present, possibly empty
    chain of them; older releases None or a callable)."""
    if not _RUNTIME:
        from triton import knobs

        _RUNTIME.append(knobs.runtime)
    runtime = _RUNTIME[0]
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", True)):
            return True
    return False


class Launcher:
    """``Launcher(jit_fn)(grid, args, constexprs, **options)``: ``jit_fn[grid](*args, **constexprs,
    **options)``, with the compiled kernel cached per specialization (module docstring).

    ``args`` are the kernel's leading runtime arguments in order; ``constexprs`` name every
    remaining parameter. Launches run on the current CUDA stream, as Triton's own do.
    """

    # Triton 3.3 and newer pass every argument, constexprs included, to the compiled launcher.
    _direct = _triton_version() >= (3, 3)

    def __init__(self, fn):
        self.fn = fn
        self.names = tuple(fn.arg_names)
        self._kernels: dict = {}

    def traced(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int = 3) -> None:
        """``wrap_triton(jit_fn)[grid](*args, **constexprs, num_warps=..., num_stages=...)``: a
        launch that ``torch.compile`` traces into its graph (Inductor then launches the kernel
        from its own code); outside a trace, a plain launch. Inductor takes the warps and stages
        of a launch, not Triton's other options (programmatic dependent launch, FP fusion), so
        the callers turn off the features that need them."""
        from torch.library import wrap_triton

        wrap_triton(self.fn)[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)

    def launch(self, grid: tuple, args: tuple, constexprs: dict, *, traced: bool = False, bind: bool = False,
               **options):
        """One launch the way the caller needs it: traced into a graph (:meth:`traced`, which
        takes the warps and stages of ``options`` only), bound for repeating (returns
        :meth:`bind`'s ``again``), or plain (returns None)."""
        if traced:
            self.traced(grid, args, constexprs, num_warps=options["num_warps"], num_stages=options.get("num_stages", 3))
            return None
        if bind:
            return self.bind(grid, args, constexprs, **options)
        self(grid, args, constexprs, **options)
        return None

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, **options):
        """Launch; returns the cached compiled launch ``(run, function, metadata, constexpr
        values)`` it used or made (None where the launch went through ``kernel[grid]`` only)."""
        first = args[0]  # every bitfx kernel's first argument is a tensor
        if isinstance(first, _Tensor) and first.is_cuda:
            device = first.get_device()
            if device != current_cuda_device():  # Triton launches on the current device: make it the tensors'
                with torch.cuda.device(device):
                    return self(grid, args, constexprs, **options)
        if not self._direct or interpreting() or _hooks_set():
            if interpreting():  # the test sessions without a GPU: the same contract as a direct launch
                self._check_names(args, constexprs)
            self.fn[grid](*args, **constexprs, **options)
            return None
        device = torch.cuda.current_device()
        key = (tuple(map(_arg_key, args)), tuple(constexprs.values()), tuple(options.items()), device)
        entry = self._kernels.get(key)
        if entry is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            tail = self._check_names(args, constexprs)
            run = getattr(kernel, "run", None)  # the compiled launcher, loaded by the launch above
            function = getattr(kernel, "function", None)
            if run is not None and function is not None and hasattr(kernel, "packed_metadata"):
                entry = self._kernels[key] = (run, function, kernel.packed_metadata,
                                              tuple(constexprs[n] for n in tail))
            return entry
        run, function, metadata, tail_values = entry
        run(*_grid3(grid), _stream()(device), function, metadata, None, None, None, *args, *tail_values)
        return entry

    def _check_names(self, args: tuple, constexprs: dict) -> tuple:
        """The kernel's parameters after ``args``, which ``constexprs`` must name, every one (the
        compiled launcher takes them all, defaults included, in order)."""
        tail = self.names[len(args):]
        if set(tail) != set(constexprs):
            raise TypeError(f"bitfx launcher: {self.fn.__name__} takes {self.names}, got {len(args)} "
                            f"arguments and constexprs {sorted(constexprs)}")
        return tail

    def bind(self, grid: tuple, args: tuple, constexprs: dict, **options):
        """Launch as :meth:`__call__` does, and return ``again(*args, grid=None, rows=None)``: the
        same launch (constexprs, options; this grid unless another is given, or this grid with
        ``rows`` as its second dimension) for new arguments that
        Triton would specialize as ``args`` (the same dtypes, 16-byte alignment and int classes:
        the caller's promise). ``again`` calls the compiled launcher with no key to build; where
        launches do not go through it (the interpreter, an old Triton) and while a launch hook is
        installed, it launches through :meth:`__call__`; so does a call while another device
        than the bound launch's is current (which :meth:`__call__` makes the tensors')."""
        entry = self(grid, args, constexprs, **options)
        if entry is None:
            def again(*new_args, grid=grid, rows=None):
                if rows is not None:
                    grid = (tuple(grid) + (1, 1))[:1] + (rows,) + (tuple(grid) + (1, 1))[2:3]
                self(grid, new_args, constexprs, **options)

            return again
        run, function, metadata, tail_values = entry
        bound = grid
        g0, g1, g2 = _grid3(grid)
        device = args[0].get_device()  # the device __call__ launched on (a launch through the compiled launcher: CUDA)
        stream = _stream()

        def again(*new_args, grid=None, rows=None):
            if _hooks_set() or current_cuda_device() != device:
                if rows is not None:
                    grid = (g0, rows, g2)
                self(bound if grid is None else grid, new_args, constexprs, **options)
            elif rows is not None:
                run(g0, rows, g2, stream(device), function, metadata, None, None, None, *new_args, *tail_values)
            elif grid is None:
                run(g0, g1, g2, stream(device), function, metadata, None, None, None, *new_args, *tail_values)
            else:
                run(*_grid3(grid), stream(device), function, metadata, None, None, None, *new_args, *tail_values)

        return again


def _grid3(grid: tuple) -> tuple:
    """A grid of one to three dimensions as three (the missing ones 1)."""
    return (tuple(grid) + (1, 1))[:3]


_STREAM = []


def stream_handle(device) -> int:
    """The handle of the CUDA stream current on ``device`` (an index or ``torch.device``): the
    stream a launch there runs on."""
    return _stream()(device.index if isinstance(device, torch.device) else device)


def _stream():
    """Triton's ``get_current_stream(device)`` (the current CUDA stream's handle)."""
    if not _STREAM:
        from triton.runtime import driver

        _STREAM.append(driver.active.get_current_stream)
    return _STREAM[0]
