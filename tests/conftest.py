"""Shared fixtures. One Ray instance per test session (starting Ray costs ~5 s and ~0.7 GB)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train V2 blocks ~2 s per report unless the controller polls faster (DESIGN.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session (no dashboard), shut down at the end."""
    import tempfile

    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # short: socket paths are limited
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()
