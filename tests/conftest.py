"""Shared by every test module."""

from __future__ import annotations

import os

from hypothesis import settings

# `make test`: the same examples every run, so a red CI can be reproduced; `make fuzz`: a longer search
# with fresh random draws (HYPOTHESIS_PROFILE=explore).
settings.register_profile("ci", max_examples=200, derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=5000, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run for real where CUDA is; elsewhere they are skipped (the CPU suite fakes CUDA)."""
    import pytest

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
