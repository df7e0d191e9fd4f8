"""Tests that need 8 (fake CPU) devices. The main suite's process has one device: it skips them here, and
``tests/test_sharding.py`` runs this directory in a subprocess with ``--xla_force_host_platform_device_count=8``."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import jax

    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: run by tests/test_sharding.py in a subprocess")
    for item in items:
        if "tests/sharding/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
