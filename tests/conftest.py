"""Shared by every test module: offline and isolated by default, hypothesis profiles, the `gpu` marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# `make test`: the same examples every run, so a red CI can be reproduced; `make fuzz`: a longer search
# with fresh random draws (HYPOTHESIS_PROFILE=explore).
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=5000, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def offline_and_isolated(tmp_path_factory: pytest.TempPathFactory):
    """No test reaches the Hub, and none reads or writes the user's preprocessing cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_DATASETS_OFFLINE", "1")
    patch.setenv("CLM_RUNNER_CACHE", str(tmp_path_factory.mktemp("clm-runner-cache")))
    yield
    patch.undo()


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A preprocessing cache of this test's own (empty at its start)."""
    monkeypatch.setenv("CLM_RUNNER_CACHE", str(tmp_path / "clm-runner-cache"))
    return tmp_path / "clm-runner-cache"


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run for real where CUDA is; elsewhere they are skipped (the CPU suite fakes CUDA)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
