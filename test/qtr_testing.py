"""Helpers shared by tests (importable as `qtr_testing`: test/ is on sys.path via test/conftest.py).

Use `from qtr_testing import ros_subprocess_env, REPO_ROOT, ...` rather than `from conftest import`
(several conftest.py files share that module name).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("QTR_VENV", REPO_ROOT / ".venv"))
INSTALL_PREFIX = REPO_ROOT / "install" / "q_transformer_ros"
PY_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
INSTALL_SITE_PACKAGES = INSTALL_PREFIX / "lib" / f"python{PY_VERSION}" / "site-packages"

# Environment every test (and every subprocess it starts) should see; callers' values win.
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def _prepend_env_path(name: str, entry: Path) -> None:
    parts = [p for p in os.environ.get(name, "").split(os.pathsep) if p and p != str(entry)]
    os.environ[name] = os.pathsep.join([str(entry), *parts])


def make_generated_interfaces_importable() -> None:
    """Let `q_transformer_ros.msg`/`.srv` import even when the source tree shadows the install tree.

    The generated Python extension needs libq_transformer_ros__rosidl_*.so from install/lib; the
    dynamic loader only reads LD_LIBRARY_PATH at process start, so preload them by absolute path
    (RTLD_GLOBAL) and extend the package's __path__ with the installed package folder.
    """
    if not INSTALL_SITE_PACKAGES.is_dir():
        return
    for entry in (INSTALL_PREFIX, VENV):
        for name in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
            if str(entry) not in os.environ.get(name, "").split(os.pathsep):
                # Subprocesses and ament_index lookups see our package and the wheels' prefix.
                parts = os.environ.get(name, "")
                os.environ[name] = os.pathsep.join(p for p in (parts, str(entry)) if p)
    _prepend_env_path("LD_LIBRARY_PATH", INSTALL_PREFIX / "lib")  # for subprocesses
    _prepend_env_path("PYTHONPATH", INSTALL_SITE_PACKAGES)  # for subprocesses
    import q_transformer_ros

    installed_pkg = str(INSTALL_SITE_PACKAGES / "q_transformer_ros")
    if installed_pkg in list(q_transformer_ros.__path__):
        return  # imported from the install tree already: nothing to do
    libs = sorted((INSTALL_PREFIX / "lib").glob("libq_transformer_ros__rosidl_*.so"))
    # generator_c first: the other libraries link against it.
    libs.sort(key=lambda p: (0 if "generator_c" in p.name else 1, p.name))
    for lib in libs:
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            return  # missing ROS libraries (pip path): leave msg/srv unavailable
    q_transformer_ros.__path__.append(installed_pkg)



def ros_subprocess_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that uses ROS: venv + colcon overlay on the paths, Fast DDS.

    Mirrors scripts/ros_env.sh, so a subprocess sees exactly what `ros2 run` would.
    """
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = os.pathsep.join([str(VENV / "bin"), env.get("PATH", "")])
    for name, entries in (
        ("AMENT_PREFIX_PATH", [INSTALL_PREFIX, VENV]),
        ("CMAKE_PREFIX_PATH", [INSTALL_PREFIX, VENV]),
        ("LD_LIBRARY_PATH", [INSTALL_PREFIX / "lib", VENV / "lib"]),
        ("PYTHONPATH", [INSTALL_SITE_PACKAGES]),
    ):
        old = [p for p in env.get(name, "").split(os.pathsep) if p and p not in map(str, entries)]
        env[name] = os.pathsep.join([*map(str, entries), *old])
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    env.update(extra)
    return env


def wait_for(predicate: Callable[[], bool], timeout: float = 8.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms (DDS callbacks run on another thread); fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def ros_domain(domain_id: int) -> Iterator[None]:
    """rclpy initialised on a test file's own DDS domain, localhost only; the environment restored after.

    Set right before rclpy.init: other test modules may change os.environ at import."""
    import rclpy  # noqa: PLC0415 - only the DDS tests need it

    saved = {k: os.environ.get(k) for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")}
    os.environ["ROS_DOMAIN_ID"] = str(domain_id)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    rclpy.init(domain_id=domain_id)
    try:
        yield
    finally:
        rclpy.try_shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call_trigger(executor: Any, client: Any, timeout: float = 10.0) -> Any:
    """Call a std_srvs/Trigger service, spinning ``executor`` until the answer (fails naming the service)."""
    from std_srvs.srv import Trigger  # noqa: PLC0415

    assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
    future = client.call_async(Trigger.Request())
    end = time.monotonic() + timeout
    while not future.done() and time.monotonic() < end:
        executor.spin_once(timeout_sec=0.01)
    assert future.done(), f"no answer from {client.srv_name}"
    return future.result()


class Spinner:
    """Spins one node in its own SingleThreadedExecutor and thread (nodes come and go without touching the
    others, as separate processes would run them)."""

    def __init__(self, node: Any) -> None:
        from rclpy.executors import SingleThreadedExecutor  # noqa: PLC0415 - only the DDS tests need it

        self.node = node
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.node.destroy_node()
