"""Shared by the tests that run `clm-runner` as real subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import subprocess_env


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for a module's runs, kept across its tests (they compare with a shared reference run)."""
    return tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2].removeprefix("test_"))


@pytest.fixture(scope="module")
def env(workdir: Path) -> dict[str, str]:
    """The subprocesses' environment: offline, one thread, this module's own preprocessing cache."""
    return subprocess_env(workdir / "cache")
