"""Shared pytest set-up for the whole suite: the ROS environment, paths, and markers.

Tests normally run through `bash scripts/run_tests.sh`, which sources scripts/ros_env.sh (venv, colcon
install overlay first on PYTHONPATH, Fast DDS, EGL) and runs `python -P -m pytest` so that
`q_transformer_ros` comes from the colcon install (where the generated msg/srv live next to our
modules). This file also makes a bare `.venv/bin/python -m pytest test/...` work: the source tree is
then imported first, and the generated interfaces are made importable from the install tree.

Rules for test files (prepend import mode): no `__init__.py` under test/, and test file basenames
unique across test/ subfolders.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import pytest

from qtr_testing import (  # noqa: E402  (test/ is on sys.path: this file's folder)
    INSTALL_PREFIX,
    REPO_ROOT,
    VENV,
    make_generated_interfaces_importable,
    ros_subprocess_env,
)

make_generated_interfaces_importable()

# torch (and torchvision, which open_clip imports) before MuJoCo in one process: the reverse order
# segfaults inside torchvision's import. Test files run in any order (-k, a single folder), so import
# them here, first.
try:
    import torch  # noqa: F401, E402
    import torchvision  # noqa: F401, E402
except ImportError:  # the ROS-free packaging checks run without them
    pass


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository checkout."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def install_prefix() -> Path:
    """install/q_transformer_ros from `bash scripts/colcon_build.sh`; fails loudly if it was not built."""
    if not (INSTALL_PREFIX / "share" / "q_transformer_ros" / "package.xml").is_file():
        pytest.fail(f"no colcon install at {INSTALL_PREFIX}: run `bash scripts/colcon_build.sh`")
    return INSTALL_PREFIX


@pytest.fixture(scope="session")
def venv_python() -> Path:
    """The venv's interpreter (the one scripts/setup_env.sh provisioned)."""
    candidate = VENV / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests on machines without CUDA (CI here has no GPU)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> list[str]:
    import q_transformer_ros

    return [
        f"q_transformer_ros from: {', '.join(q_transformer_ros.__path__)}",
        f"RMW_IMPLEMENTATION={os.environ.get('RMW_IMPLEMENTATION')} MUJOCO_GL={os.environ.get('MUJOCO_GL')}"
        f" python={sys.executable} ({sysconfig.get_python_version()})",
    ]


@pytest.fixture
def one_thread():
    """Tiny models are op-overhead bound: one intra-op torch thread is faster and immune to a busy machine."""
    import torch  # noqa: PLC0415

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
