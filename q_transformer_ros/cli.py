"""Entry points for the executables, importable without ROS.

Why this module: on the pip path (training clusters, laptops) rclpy may be missing. The ROS node
modules import rclpy at the top, so a console script pointing straight at them dies with an
ImportError traceback. These wrappers import the node module lazily and turn a missing rclpy into
one line saying what to do, with a non-zero exit code.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

_NO_ROS_HINT = (
    "{exe}: rclpy is not importable ({error}). This executable needs ROS 2: source "
    "scripts/ros_env.sh (after scripts/setup_env.sh), or install the ROS 2 wheels listed in "
    "requirements/ros.txt. The ROS-free tools (train, convert_bag, lerobot_import, lerobot_export) work without it."
)


def _ros_main(exe: str, module: str) -> Callable[[], int]:
    def run() -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing = getattr(e, "name", "") or ""
            if missing.split(".")[0] in ("rclpy", "rosidl_runtime_py", "rcl_interfaces", "builtin_interfaces",
                                         "std_msgs", "sensor_msgs", "geometry_msgs", "trajectory_msgs", "std_srvs"):
                print(_NO_ROS_HINT.format(exe=exe, error=e), file=sys.stderr)
                return 2
            raise
        return mod.main()

    run.__name__ = exe
    run.__doc__ = f"`{exe}`: see {module}.main."
    return run


def _plain_main(module: str) -> Callable[[], int]:
    def run() -> int:
        return importlib.import_module(module).main(sys.argv[1:])

    run.__doc__ = f"See {module}.main."
    return run


policy_node = _ros_main("policy_node", "q_transformer_ros.ros.policy_node")
sim_node = _ros_main("sim_node", "q_transformer_ros.ros.sim_node")
expert_node = _ros_main("expert_node", "q_transformer_ros.ros.expert_node")
record = _ros_main("record", "q_transformer_ros.ros.recorder")
train = _plain_main("q_transformer_ros.core.trainer")
convert_bag = _plain_main("q_transformer_ros.data.convert")
lerobot_import = _plain_main("q_transformer_ros.data.lerobot_import")
lerobot_export = _plain_main("q_transformer_ros.data.lerobot_export")
demo = _plain_main("q_transformer_ros.demo")
