"""Test set-up: Triton's CPU interpreter when there is no GPU, and the hypothesis profiles.

Profiles (choose with BITFX_HYPOTHESIS_PROFILE): ``ci`` (default) is deterministic and sized
for the 2-core CI machine; ``dev`` draws many more examples for a local run.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=300, **_common)
settings.load_profile(os.environ.get("BITFX_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after a test (``pytestmark =
    pytest.mark.usefixtures("fresh_dynamo")`` for a whole module): a test that counts graphs,
    recompiles or op calls sees only its own compiles."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
