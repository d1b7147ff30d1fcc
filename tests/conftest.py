"""Shared fixtures. One Ray instance per test session (starting Ray costs ~5 s and ~0.7 GB)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train V2 blocks ~2 s per report unless the controller polls faster (docs/architecture.md).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
# Ray Train starts a PreemptionWatcher actor (one more Python process, ~1.5 s of a tiny fit here) per run to follow
# node draining, which no test does; runs of the product keep it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny matrices are fastest so, the CPUs are shared, and the actors run one
    thread (threads_per_worker 1), so in-process oracle runs must too for equal bits. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny RL world of tests/worlds.py (tokenizer, SFT policy, two reward models, prompts), one per module."""
    from worlds import make_world

    return make_world(tmp_path_factory.mktemp("world"))
