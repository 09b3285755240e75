"""Fixtures shared by the store tests: one tiny store built once per session (copy it before corrupting)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from store_helpers import build_store, fake_experts


@pytest.fixture(scope="session")
def experts():
    """The fake experts of the tiny store (2 layers x 3 split experts, K=4, zstd; one raw float32 expert)."""
    return fake_experts()


@pytest.fixture(scope="session")
def pristine_store(tmp_path_factory, experts) -> Path:
    """A complete tiny store; never modify it (use `store`)."""
    return build_store(tmp_path_factory.mktemp("pristine") / "store", experts)


@pytest.fixture
def store(tmp_path, pristine_store) -> Path:
    """A private copy of the tiny store that a test may corrupt."""
    dest = tmp_path / "store"
    shutil.copytree(pristine_store, dest)
    return dest
