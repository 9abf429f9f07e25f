"""One way to run a node from an executable's ``main``: spin, shut down cleanly, report set-up errors.

Why: every executable (policy node, sim, expert, recorder) needs the same ros2/examples idiom —
Ctrl-C and external shutdown end quietly, the node is destroyed (which is where nodes send their stop
command or save an open bag), and ``rclpy.try_shutdown`` always runs. A node that cannot even be built
(bad contract, missing checkpoint, no OpenGL) is reported as one fatal log line and exit code 1, not a
traceback, because that is a configuration problem for the user, not a bug.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import rclpy
from rclpy.executors import Executor, ExternalShutdownException
from rclpy.node import Node


WAKE_S = 0.2
"""Longest the executor waits in one round (see ``spin_node``)."""


def spin_node(make_node: Callable[[], Node], node_name: str, executor: Executor | None = None) -> int:
    """Build the node with ``make_node`` (rclpy already initialised) and spin it until shutdown.

    ``executor``: spin on this executor (e.g. a MultiThreadedExecutor) instead of ``rclpy.spin``.
    Returns the process exit code."""
    node = None
    try:
        node = make_node()
        if executor is None:
            rclpy.spin(node)
        else:
            executor.add_node(node)
            # spin_once with a timeout, not spin(): a node that leaves signals to Python (the policy node)
            # runs its handler only between bytecodes, and rcl_wait with no message and no timer due (a
            # sim-time node after the sim stopped publishing /clock) would otherwise block Ctrl-C forever
            while rclpy.ok(context=executor.context):
                executor.spin_once(timeout_sec=WAKE_S)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as e:  # noqa: BLE001 - one clear line for set-up errors; real bugs still raise
        if node is None:
            rclpy.logging.get_logger(node_name).fatal(f"{type(e).__name__}: {e}")
            return 1
        if rclpy.ok(context=node.context):
            raise
        # Shut down (Ctrl-C, SIGTERM, launch) while a callback ran: its publish then fails with "publisher's
        # context is invalid" (seen in sim_node logs at the demo's end). That is the shutdown, not a bug.
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def print_help_if_asked(args: Sequence[str] | None, usage: str, doc: str | None) -> bool:
    """``-h`` / ``--help`` before ``--ros-args``: print the usage and the module's description and return
    True (the caller exits 0 without starting ROS); otherwise False."""
    argv = list(sys.argv if args is None else args)[1:]
    if "--ros-args" in argv:
        argv = argv[: argv.index("--ros-args")]
    if not any(a in ("-h", "--help") for a in argv):
        return False
    print(f"usage: {usage}\n")
    print((doc or "").strip())
    return True
