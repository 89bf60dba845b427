"""Test-wide settings: no telemetry, no update checks, no runtime installs, a private FLWR_HOME."""

import os
import tempfile

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedmoe-flwr-home-"))


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# No per-example time limit: a deadline is a wall-clock assertion, and the suite shares its
# cores (CI machines, benchmarks beside it); the property, not the speed, is under test.
settings.register_profile("fedmoe", deadline=None)
settings.load_profile("fedmoe")


@pytest.fixture
def runtime_identity():
    """Messages take their run id from the process's task identity (Flower's runtime sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id) if hasattr(TaskIdentity, "_task_id") else None
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    if saved is not None:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def one_torch_thread():
    """Tiny models train ~2x faster on one thread (and CPU time is shared with other tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
