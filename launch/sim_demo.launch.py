"""Meta-World sim + Q-Transformer policy in closed loop:
``ros2 launch q_transformer_ros sim_demo.launch.py checkpoint:=demo_out/train/checkpoint.pt task:=drawer-open-v3``.

Starts ``sim_node`` (the robot of config/contract_ee_arm.yaml: camera, /ee_cmd, /gripper_cmd,
/instruction, /success) and ``policy_node`` (loads the checkpoint; publishes ~/decision). Arguments:
checkpoint, task, seed, max_episode_steps, device, params_file (policy node parameters, default the
installed config/policy.yaml), use_sim_time (default true: sim_node publishes /clock and steps as soon
as the policy's command arrives, the policy node follows /clock; false: a wall-clock sim at the
contract's rate, to watch it in real time). Start a new episode with
``ros2 service call /sim_node/reset std_srvs/srv/Trigger`` (after ``ros2 param set /sim_node seed 7``).
Without the ros2 CLI, the same two nodes run from ``python -m q_transformer_ros.demo --stages eval``.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("q_transformer_ros")
    contract = os.path.join(share, "config", "contract_ee_arm.yaml")
    policy_params = os.path.join(share, "config", "policy.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint", description="Checkpoint file of a policy trained on the ee_arm contract."),
        DeclareLaunchArgument("task", default_value="drawer-open-v3", description="Meta-World v3 task."),
        DeclareLaunchArgument("seed", default_value="1000", description="Layout seed of the first episode."),
        DeclareLaunchArgument("max_episode_steps", default_value="120", description="Steps before an episode ends as failed."),
        DeclareLaunchArgument("device", default_value="cpu", description="Torch device of the policy (auto, cpu, cuda)."),
        DeclareLaunchArgument("params_file", default_value=policy_params, description="policy_node parameters (YAML)."),
        DeclareLaunchArgument("use_sim_time", default_value="true",
                              description="Sim time: sim_node publishes /clock and skips idle time; false = wall clock."),
        Node(
            package="q_transformer_ros",
            executable="sim_node",
            name="sim_node",
            parameters=[{
                "contract": contract,
                "task": LaunchConfiguration("task"),
                "seed": LaunchConfiguration("seed"),
                "max_episode_steps": LaunchConfiguration("max_episode_steps"),
                "publish_clock": LaunchConfiguration("use_sim_time"),
            }],
            output="screen",
            emulate_tty=True,
        ),
        Node(
            package="q_transformer_ros",
            executable="policy_node",
            name="policy_node",
            parameters=[
                LaunchConfiguration("params_file"),
                {"checkpoint": LaunchConfiguration("checkpoint"), "device": LaunchConfiguration("device"),
                 "use_sim_time": LaunchConfiguration("use_sim_time")},
            ],
            output="screen",
            emulate_tty=True,
        ),
    ])
