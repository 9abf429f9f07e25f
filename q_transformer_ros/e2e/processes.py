"""Start ROS nodes of this package as child processes, with their logs in files, and stop them cleanly.

Why child processes and not threads: the simulator renders, the policy runs torch, the recorder
writes bags; in separate processes they do not fight over one GIL, exactly as on a robot, and the
demo exercises the real executables (``python -m q_transformer_ros.ros.<node> --ros-args ...``).

Every child gets the demo's ``ROS_DOMAIN_ID`` and ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` (so two
demos, or a demo and a test run, never see each other), the same ``q_transformer_ros`` the parent
imported (first on ``PYTHONPATH``), and dies with the parent (``PR_SET_PDEATHSIG``) so a killed demo
leaves no simulator running.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import q_transformer_ros

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def node_env(domain_id: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a child node: ours, plus the domain, localhost discovery and our package path."""
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(int(domain_id))
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("PYOPENGL_PLATFORM", "egl")
    env["PYTHONUNBUFFERED"] = "1"
    pkg_parent = str(Path(next(iter(q_transformer_ros.__path__))).resolve().parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != pkg_parent]
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *parts])
    env.update(extra or {})
    return env


def ros_args(params: Mapping[str, Any]) -> list[str]:
    """``{'task': 'x', 'seed': 3, 'flag': True}`` -> ``['--ros-args', '-p', 'task:=x', ...]``."""
    out = ["--ros-args"]
    for key, value in params.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = "[" + ",".join(f"'{v}'" for v in value) + "]"
        else:
            text = str(value)
        out += ["-p", f"{key}:={text}"]
    return out


class NodeProcess:
    """One node executable as a child process; stdout+stderr go to ``log_path``."""

    def __init__(self, name: str, module: str, params: Mapping[str, Any], log_path: Path, domain_id: int,
                 pre_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.module = module
        self.log_path = Path(log_path)
        self.cmd = [sys.executable, "-m", module, *pre_args, *ros_args(params)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n$ ROS_DOMAIN_ID={domain_id} {' '.join(self.cmd)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=node_env(domain_id, env), preexec_fn=_die_with_parent)

    def check_alive(self) -> None:
        """Raise with the log's tail if the node has exited."""
        rc = self.proc.poll()
        if rc is not None:
            raise RuntimeError(f"node {self.name} ({self.module}) exited with status {rc}; last lines of "
                               f"{self.log_path}:\n{self.tail()}")

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGINT (rclpy shuts down cleanly), then SIGTERM, then SIGKILL."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    self.proc.send_signal(sig)
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
        self._log.close()
        return self.proc.poll()


class NodeGroup:
    """Several NodeProcess children stopped together (context manager)."""

    def __init__(self) -> None:
        self.nodes: list[NodeProcess] = []

    def start(self, *args: Any, **kwargs: Any) -> NodeProcess:
        node = NodeProcess(*args, **kwargs)
        self.nodes.append(node)
        return node

    def check_alive(self) -> None:
        for node in self.nodes:
            node.check_alive()

    def __enter__(self) -> "NodeGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        for node in reversed(self.nodes):
            node.stop()

