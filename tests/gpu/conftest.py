"""Tests that need a real NVIDIA GPU: skipped, with the reason, on hosts without one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hypervisor.telemetry.nvml import open_nvml


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def nvml():
    nv, why = open_nvml()
    if nv is None:
        pytest.skip(f"no NVIDIA GPU here: {why}")
    return nv


@pytest.fixture(scope="session")
def report():
    """Figures worth keeping, written to $NEURAOS_GPU_REPORT (JSON) when it is set."""
    figures: dict = {}
    yield figures
    path = os.environ.get("NEURAOS_GPU_REPORT")
    if path and figures:
        Path(path).write_text(json.dumps(figures, indent=2, default=str))
