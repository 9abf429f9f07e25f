"""The Observation type: what the robot shows at one decision moment, as its contract declares it.

Why one type: frames, robot state and (for the node) their ages are produced by the converter and the
control loop and consumed by the policy and the agent. Carried positionally, every new input (state,
depth, force, a second arm) would change a dozen signatures; carried as one value checked against the
contract in one place, it changes this module (lerobot's ``input_features`` is the same idea).

ROS-free and torch-free (numpy + the contract), so every layer can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from q_transformer_ros.contract import RobotContract


class ObservationError(ValueError):
    """An observation that does not match the contract; the message names the camera or state input."""


@dataclass(frozen=True)
class Observation:
    """One time step of input: a frame per camera and the raw state inputs.

    ``frames``: camera name -> uint8 ``(3, H, W)`` RGB at the contract's size (the output of
    ``data.image.preprocess_frame``; bag and live frames go through that one function).
    ``state``: float ``(S,)`` raw state inputs in ``contract.state_inputs`` order and the sources' units
    (the model normalises with the contract's ranges); None when the contract declares none.
    ``stamps_ns``: optional source stamps (camera or state-input name -> ns) for logs and decisions."""

    frames: Mapping[str, np.ndarray]
    state: np.ndarray | None = None
    stamps_ns: Mapping[str, int] = field(default_factory=dict)

    def check(self, contract: RobotContract, where: str = "observation") -> None:
        """Raise ObservationError unless cameras, shapes, dtypes and state match ``contract``; a
        non-finite state value is an error (a robot must never be commanded from one)."""
        if not isinstance(self.frames, Mapping):
            raise ObservationError(f"{where}: frames must be a dict {{camera name: array}}, got {type(self.frames).__name__}")
        got, want = sorted(self.frames), sorted(c.name for c in contract.cameras)
        if got != want:
            raise ObservationError(f"{where}: frames have cameras {got}, contract '{contract.name}' has {want}")
        for cam in contract.cameras:
            arr = self.frames[cam.name]
            shape = getattr(arr, "shape", None)
            if shape != (3, cam.height, cam.width) or getattr(arr, "dtype", None) != np.uint8:
                raise ObservationError(
                    f"{where}: camera '{cam.name}': frame shape {shape} dtype {getattr(arr, 'dtype', None)}, "
                    f"expected uint8 (3, {cam.height}, {cam.width}) (channels first, RGB; use data.image.preprocess_frame)")
        check_state(self.state, contract, where)


def check_state(state: np.ndarray | None, contract: RobotContract, where: str = "observation") -> None:
    """The one state check (shape ``(..., S)``, numeric, finite) shared by observations and batches."""
    names = [s.name for s in contract.state_inputs]
    if not names:
        if state is not None and np.asarray(state).size:
            raise ObservationError(f"{where}: state given, but contract '{contract.name}' declares no state_inputs")
        return
    if state is None:
        raise ObservationError(f"{where}: no state; contract '{contract.name}' declares state inputs {names}")
    arr = np.asarray(state)
    if arr.shape[-1:] != (len(names),) or not np.issubdtype(arr.dtype, np.number):
        raise ObservationError(f"{where}: state has shape {arr.shape} dtype {arr.dtype}, expected numeric "
                               f"(..., {len(names)}) for state inputs {names}")
    flat = arr.reshape(-1, len(names)).astype(np.float64)
    bad = ~np.isfinite(flat)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ObservationError(f"{where}: state input '{names[col]}' is {flat[row, col]} (NaN/inf)")
