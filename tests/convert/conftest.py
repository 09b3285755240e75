"""Shared fixtures for converter / inspect / verify tests: tiny checkpoints, built once per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """model_type -> path of a tiny random checkpoint saved by transformers (built on first use)."""
    from tests.tiny_models import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("hf")
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_tiny_checkpoint(model_type, root / model_type)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def mixtral_store(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny mixtral store (read-only use: copy it before corrupting it)."""
    from zipmoe.convert import convert

    return convert(tiny_checkpoint("mixtral"), tmp_path_factory.mktemp("stores") / "mixtral", progress=False)
