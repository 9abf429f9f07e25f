"""Small ready-made contracts and episodes for tests across the project (no pytest dependency).

Why here: every helper's tests (learner, trainer, converter, node) need a valid contract of a tiny
size and a few synthetic episodes; defining them once keeps them consistent.
"""

from __future__ import annotations

import numpy as np

from q_transformer_ros.replay.writer import EpisodeData
from q_transformer_ros.contract import (
    ActionDimSpec, CameraSpec, FieldRef, InstructionSpec, RobotContract, StateInputSpec, SuccessSpec,
)


def tiny_contract(
    num_cameras: int = 1,
    size: int = 32,
    num_dims: int = 3,
    bins: int = 8,
    frame_history: int = 2,
    discount: float = 0.9,
    low: float = -1.0,
    high: float = 1.0,
    name: str = "tiny",
    state_dim: int = 0,
) -> RobotContract:
    """A valid contract: ``num_cameras`` cameras (``cam0``, ``cam1``, ...) of ``size``², ``num_dims``
    action dims (``a0`` ...) in [low, high] with ``bins`` bins each, commanded via Float64MultiArray,
    and ``state_dim`` state inputs (``s0`` ...: joint ``j<i>`` positions of /joint_states, range [-2, 2])."""
    cams = tuple(CameraSpec(name=f"cam{i}", topic=f"/cam{i}/image_raw", height=size, width=size)
                 for i in range(num_cameras))
    dims = tuple(
        ActionDimSpec(
            name=f"a{i}", low=low, high=high, bins=bins,
            source=FieldRef(topic="/command", msg_type="std_msgs/msg/Float64MultiArray", field=f"data[{i}]"),
            target=FieldRef(topic="/command", msg_type="std_msgs/msg/Float64MultiArray", field=f"data[{i}]"),
        )
        for i in range(num_dims)
    )
    states = tuple(
        StateInputSpec(name=f"s{i}", low=-2.0, high=2.0,
                       source=FieldRef(topic="/joint_states", msg_type="sensor_msgs/msg/JointState",
                                       field="position", joint=f"j{i}"))
        for i in range(state_dim)
    )
    return RobotContract(
        name=name, cameras=cams, action_dims=dims, frame_history=frame_history, control_rate_hz=10.0,
        instruction=InstructionSpec(topic="/instruction", allow_none=True), success=SuccessSpec(topic="/success"),
        discount=discount, state_inputs=states,
    )


def random_episode(
    contract: RobotContract,
    length: int,
    rng: np.random.Generator,
    success: bool = True,
    terminal: bool | None = None,
    instruction: str | None = "pick the cube",
    source_id: str | None = None,
    rewards: np.ndarray | None = None,
) -> EpisodeData:
    """Random frames and in-range actions of the contract's shapes."""
    frames = {c.name: rng.integers(0, 256, size=(length, 3, c.height, c.width), dtype=np.uint8)
              for c in contract.cameras}
    actions = rng.uniform(contract.action_low, contract.action_high,
                          size=(length, contract.num_action_dims)).astype(np.float32)
    state = (rng.uniform(contract.state_low, contract.state_high, size=(length, contract.state_dim)).astype(np.float32)
             if contract.state_dim else None)
    return EpisodeData(frames=frames, actions=actions, success=success, terminal=terminal,
                       instruction=instruction, source_id=source_id, rewards=rewards, state=state)
