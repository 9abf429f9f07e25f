"""Field references: reading from rosbags messages, writing into rclpy messages, joint lookup, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from q_transformer_ros.data.bag_reader import typestore_for
from q_transformer_ros.contract import FieldRef, load_contract
from q_transformer_ros.data.messages import (
    FieldError, actions_from_messages, group_dims_by_topic, parse_field_path, read_field, write_action, write_field,
)

CONFIG = Path(__file__).resolve().parents[2] / "config"
TS = typestore_for(None)


def test_parse_field_path() -> None:
    assert parse_field_path("points[0].positions[12]") == (("points", 0), ("positions", 12))
    with pytest.raises(FieldError, match="bad element"):
        parse_field_path("points[x]")


def test_read_joint_by_name_from_rosbags_message() -> None:
    js = TS.types["sensor_msgs/msg/JointState"](
        header=TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id=""),
        name=["b", "a"], position=np.array([2.0, 1.0]), velocity=np.zeros(0), effort=np.zeros(0))
    ref = FieldRef(topic="/js", msg_type="sensor_msgs/msg/JointState", field="position[0]", joint="a")
    assert read_field(js, ref) == 1.0
    with pytest.raises(FieldError, match=r"topic /js .*joint 'c' not in message name \['b', 'a'\]"):
        read_field(js, FieldRef(topic="/js", msg_type="sensor_msgs/msg/JointState", field="position[0]", joint="c"))
    with pytest.raises(FieldError, match=r"index 5 out of range, 'position' has 2"):
        read_field(js, FieldRef(topic="/js", msg_type="sensor_msgs/msg/JointState", field="position[5]"))
    with pytest.raises(FieldError, match="has no field 'positions'"):
        read_field(js, FieldRef(topic="/js", msg_type="sensor_msgs/msg/JointState", field="positions[0]"))


def test_write_rclpy_commands_for_both_shipped_contracts() -> None:
    pytest.importorskip("rclpy")
    from geometry_msgs.msg import TwistStamped
    from std_msgs.msg import Float64MultiArray
    from trajectory_msgs.msg import JointTrajectory

    joint = load_contract(CONFIG / "contract_joint_arm.yaml")
    groups = group_dims_by_topic(joint.action_dims, "target")
    assert [g.topic for g in groups] == ["/arm_controller/joint_trajectory"] and len(groups[0].dim_indices) == 6
    jt = JointTrajectory()
    values = np.linspace(-0.1, 0.1, 6)
    write_action({"/arm_controller/joint_trajectory": jt}, joint.action_dims, values)
    assert list(jt.joint_names) == [d.target.joint for d in joint.action_dims]
    assert len(jt.points) == 1
    np.testing.assert_allclose(list(jt.points[0].positions), values)
    np.testing.assert_allclose(actions_from_messages({"/arm_controller/joint_trajectory": jt}, joint.action_dims,
                                                     "target"), values, rtol=1e-6)

    ee = load_contract(CONFIG / "contract_ee_arm.yaml")
    msgs = {"/ee_cmd": TwistStamped(), "/gripper_cmd": Float64MultiArray()}
    write_action(msgs, ee.action_dims, [0.1, -0.2, 0.3, 0.9])
    assert msgs["/ee_cmd"].header.frame_id == "base_link"
    assert (msgs["/ee_cmd"].twist.linear.x, msgs["/ee_cmd"].twist.linear.y) == (0.1, -0.2)
    assert list(msgs["/gripper_cmd"].data) == [0.9]
    with pytest.raises(FieldError, match="action has 3 values, the contract has 4"):
        write_action(msgs, ee.action_dims, [0.0] * 3)


def test_write_grows_lists_of_rosbags_message() -> None:
    arr = TS.types["std_msgs/msg/Float64MultiArray"](
        layout=TS.types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0), data=np.zeros(1))
    write_field(arr, FieldRef(topic="/g", msg_type="std_msgs/msg/Float64MultiArray", field="data[3]"), 4.5)
    assert list(arr.data) == [0.0, 0.0, 0.0, 4.5]


def test_topic_with_two_types_is_an_error() -> None:
    from dataclasses import replace

    ee = load_contract(CONFIG / "contract_ee_arm.yaml")
    dims = list(ee.action_dims)
    dims[3] = replace(dims[3], target=FieldRef(topic="/ee_cmd", msg_type="std_msgs/msg/Float64MultiArray", field="data[0]"))
    with pytest.raises(FieldError, match="target topic /ee_cmd has type std_msgs/msg/Float64MultiArray"):
        group_dims_by_topic(dims)
