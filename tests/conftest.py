"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.predict import trained_model_dir


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """One folder per test session for artefacts that several modules reuse."""
    return tmp_path_factory.getbasetemp() / "predict-shared"


@pytest.fixture(scope="session")
def model_dir(shared) -> Path:
    """A small detector trained briefly on synthetic data (built once per session)."""
    return trained_model_dir(shared)
