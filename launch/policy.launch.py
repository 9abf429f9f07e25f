"""Launch the Q-Transformer policy node: ``ros2 launch q_transformer_ros policy.launch.py checkpoint:=model.pt``.

Arguments: checkpoint, params_file (default: the installed config/policy.yaml), device, namespace,
use_sim_time. The params file is the source of truth; only arguments that were given on the command
line override it (an empty argument leaves the file's value alone).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
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
    return [
        Node(
            package="q_transformer_ros",
            executable="policy_node",
            name="policy_node",
            namespace=LaunchConfiguration("namespace").perform(context),
            parameters=parameters,
            output="screen",
            emulate_tty=True,
        )
    ]


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
