"""Shared fixtures: the real default model is loaded once per session (cached safetensors)."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, with the reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    from dhsa_export.hf.models import load_model

    return load_model()
