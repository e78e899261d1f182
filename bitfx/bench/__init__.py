"""The benchmarks, ``python -m bitfx.bench <subcommand>``: applications of the library, not part
of it (``import bitfx`` does not import this package).

Subcommands (one module each; :mod:`bitfx.bench.__main__` dispatches): ``sites``, ``models``,
``shapes``, ``host``, ``train``, ``fp8``, ``checkpoint``, ``tune``. The harness they share:
:mod:`~bitfx.bench.timing` (CUDA-graph, CUDA-event and wall-clock timers),
:mod:`~bitfx.bench.model_shapes` (the model configs and site shapes, defined once),
:mod:`~bitfx.bench.profiling` (profiler and compile-counter helpers) and
:mod:`~bitfx.bench.report` (headers, tables, result files). Results: BENCHMARKS.md.
"""
