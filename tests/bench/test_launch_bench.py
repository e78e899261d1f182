"""``python -m bitfx.bench launch``: which compile each variant asks for, and its arguments."""

from __future__ import annotations

import pytest

from bitfx.bench import launch as bl


def test_variants_compile_as_named(monkeypatch):
    calls = []
    monkeypatch.setattr(bl.torch, "compile", lambda model, **kw: calls.append(kw))
    for name in ("bf16", "auto", "auto-no-static", "op", "inductor", "quantized"):
        bl.compile_variant(None, name)
    assert calls == [{}, {"backend": "bitfx"},
                     {"backend": "bitfx", "options": {"static_launch_user_defined_triton_kernels": False}},
                     {"backend": "bitfx", "options": {"launch": "op"}},
                     {"backend": "bitfx", "options": {"launch": "inductor"}}, {"backend": "bitfx"}]
    assert bl.VARIANTS["op"] == {"launch": "op"}  # the options given were copies


def test_arguments():
    a = bl.parse_args(["--variants", "op,auto", "--models", "llama-8b"])
    assert a.variants == ["bf16", "op", "auto"]  # the baseline always timed, first
    assert a.models == ["llama-8b"] and a.rounds == 3 and a.reps == 20
    with pytest.raises(SystemExit):
        bl.parse_args(["--variants", "static"])
    with pytest.raises(SystemExit):
        bl.parse_args(["--rounds", "0"])
