"""Launch the Q-Transformer policy node: ``ros2 launch q_transformer_ros policy.launch.py checkpoint:=model.pt``.

Arguments: checkpoint, params_file (default: the installed config/policy.yaml), device, namespace,
use_sim_time. The params file is the source of truth; only arguments that were given on the command
line override it (an empty argument leaves the file's value alone). With ``namespace:=robot1`` the
node and every contract topic move under ``/robot1`` (the node resolves contract topics relative to its
namespace), so two robots run side by side.

A node that exits with an error (a missing checkpoint, say) ends the launch with a non-zero exit
code: launch itself returns 0 when its processes fail, unless an event handler raises.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _policy_node(context, *args, **kwargs):
    overrides = {}
    for name in ("checkpoint", "device"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context)
    if use_sim_time:
        overrides["use_sim_time"] = use_sim_time.lower() in ("true", "1", "yes")
    parameters = [LaunchConfiguration("params_file").perform(context)]
    if overrides:
        parameters.append(overrides)
    node = Node(
        package="q_transformer_ros",
        executable="policy_node",
        name="policy_node",
        namespace=LaunchConfiguration("namespace").perform(context),
        parameters=parameters,
        output="screen",
        emulate_tty=True,
    )
    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_on_error))]


class PolicyNodeFailed(RuntimeError):
    """Raised from the exit handler so that `ros2 launch` returns non-zero."""


def _fail_on_error(event, context):
    if event.returncode not in (0, None, -2, -15):  # not a clean exit, Ctrl-C or SIGTERM
        raise PolicyNodeFailed(f"{event.action.name} exited with code {event.returncode}")


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("q_transformer_ros"), "config", "policy.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", default_value="", description="Checkpoint file (holds the robot contract)."),
        DeclareLaunchArgument("params_file", default_value=default_params, description="Node parameters (YAML)."),
        DeclareLaunchArgument("device", default_value="", description="Torch device (auto, cpu, cuda); empty = params file."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node."),
        DeclareLaunchArgument("use_sim_time", default_value="", description="true to follow /clock; empty = params file."),
        OpaqueFunction(function=_policy_node),
    ])
