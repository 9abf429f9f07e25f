"""`record`: write one rosbag2 MCAP per episode from the contract's topics (no ros2 CLI needed).

Subscribes (raw, so the CDR bytes go to the bag untouched) to every camera, every action source
topic, every state input's topic, the instruction topic and the success topic of the contract. State
topics are subscribed first, as in the policy node: a state message and a frame that arrive together
are then written state first (rclpy's executor takes ready subscriptions in creation order), so the
converter pairs a frame with the state the node would have used with it. The instruction topic is
subscribed before everything else, and ``arm_episode`` starts the next episode *inside* the instruction's
callback, so a frame that follows the new instruction (a sim's first frame after a reset) is in the bag.
Each episode bag also starts
with the newest message of every state topic, at the time it was received (before the episode): the
first frame of an episode then has the state the node would have had with it. An episode starts on
``~/start_episode`` and ends on ``~/stop_episode`` (std_srvs/Trigger) or when a message arrives on the
success topic (``stop_on_success``). Each bag is written with rosbags into a temp folder and renamed
into ``output_dir`` when the episode ends, with a standard metadata.yaml, so both the converter and
stock rosbag2 tools read it. The current instruction (latched topic) is written at the start of every
episode and also stored in the bag's ``custom_data``.

Log times: the node clock when the callback runs. Under ``use_sim_time`` the log time is instead the
sim time at which the middleware *received* the message (``reception_time.ReceptionTime``): a sim that
skips idle time moves ``/clock`` by most of a period the moment a command arrives, and a callback that
runs a few milliseconds late would otherwise log that command next to the following frame. Cameras are
subscribed with a queue (``qos.RECORD_QOS``), so a recorder that falls behind a fast sim loses no frame.

Parameters: ``contract`` (path), ``output_dir``, ``storage`` (mcap | sqlite3), ``bag_prefix``,
``stop_on_success``, ``instruction`` (fallback text when there is no instruction topic),
``use_sim_time`` (ROS's own).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import rclpy
from rclpy.node import Node
from rosgraph_msgs.msg import Clock as ClockMsg
from std_srvs.srv import Trigger

from q_transformer_ros.data.bag_writer import BagWriter
from q_transformer_ros.contract import RobotContract, load_contract
from q_transformer_ros.ros.conversions import message_class
from q_transformer_ros.ros.qos import INSTRUCTION_QOS, RECORD_QOS, RECORD_RELIABLE_QOS
from q_transformer_ros.ros.params import declare
from q_transformer_ros.ros.reception_time import ReceptionTime
from q_transformer_ros.ros.runner import print_help_if_asked, spin_node


def contract_topics(contract: RobotContract) -> dict[str, tuple[str, str]]:
    """Topic -> (message type, role) for everything an episode bag needs, cameras first."""
    topics: dict[str, tuple[str, str]] = {}
    for cam in contract.cameras:
        topics[cam.topic] = (cam.msg_type, "camera")
    for d in contract.action_dims:
        topics.setdefault(d.source.topic, (d.source.msg_type, "action"))
    for s in contract.state_inputs:
        topics.setdefault(s.source.topic, (s.source.msg_type, "state"))
    if contract.instruction.topic:
        topics.setdefault(contract.instruction.topic, ("std_msgs/msg/String", "instruction"))
    if contract.success.topic:
        topics.setdefault(contract.success.topic, (contract.success.msg_type, "success"))
    return topics


USAGE = ('record [-h] --ros-args -p contract:=CONTRACT.yaml -p output_dir:=DIR'
         ' [-p storage:=mcap|sqlite3]'
         ' [-p bag_prefix:=episode]'
         ' [-p stop_on_success:=true]'
         ' [-p instruction:=TEXT]')

class EpisodeRecorder(Node):
    """One node: raw subscriptions to the contract's topics, Trigger services, one bag per episode."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("recorder", **kwargs)
        d = lambda *a, **k: declare(self, *a, **k)  # noqa: E731
        d("contract", "", "Robot contract YAML (required): the topics to record.")
        d("output_dir", "bags", "Folder that receives one bag per episode.")
        d("storage", "mcap", "Bag storage: mcap or sqlite3.")
        d("bag_prefix", "episode", "Bag names are <prefix>_<YYYYmmdd-HHMMSS>_<n>.")
        d("instruction", "", "Instruction stored in the bag metadata when no instruction message was seen.",
          read_only=False)
        d("stop_on_success", True, "End the episode when a success message arrives.")

        path = self.get_parameter("contract").value
        if not path:
            raise ValueError("recorder: parameter 'contract' (path to a contract YAML) is required")
        self.contract = load_contract(path)
        self.output_dir = Path(self.get_parameter("output_dir").value)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.storage = str(self.get_parameter("storage").value)
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"recorder: parameter 'storage' = {self.storage!r}: use mcap or sqlite3")
        self.prefix = str(self.get_parameter("bag_prefix").value)
        self.stop_on_success = bool(self.get_parameter("stop_on_success").value)
        self.topics = contract_topics(self.contract)

        self.writer: BagWriter | None = None
        self.episode_count = 0
        self.finished: list[Path] = []
        """Bags completed by this node, in order."""
        self.last_instruction: tuple[bytes, str] | None = None
        self.armed = False
        """Start an episode when the next instruction message arrives (``arm_episode``)."""
        self._instruction_time = 0
        self.state_topics = {s.source.topic for s in self.contract.state_inputs}
        self.last_state: dict[str, tuple[int, bytes]] = {}
        """State topic -> (receive time, raw message) of its newest message, episode or not."""
        self._subs = []
        self._reception: ReceptionTime | None = None
        if self.get_parameter("use_sim_time").value:
            # Created before the topics' subscriptions: a clock sample and a message that are both waiting
            # are taken sample first (rclpy's executor serves ready subscriptions in creation order).
            self._reception = ReceptionTime()
            self._clock_sub = self.create_subscription(ClockMsg, "/clock", self._on_clock, RECORD_RELIABLE_QOS)
            self._subs.append(self._clock_sub)
        order = {"instruction": 0, "state": 1}  # then the rest: cameras, commands, success
        state_first = sorted(self.topics.items(), key=lambda item: order.get(item[1][1], 2))
        for topic, (msg_type, role) in state_first:
            qos = {"camera": RECORD_QOS, "state": RECORD_QOS, "instruction": INSTRUCTION_QOS}.get(role, RECORD_RELIABLE_QOS)
            self._subs.append(self.create_subscription(
                message_class(msg_type), topic, lambda raw, info, t=topic, r=role: self._on_received(t, r, raw, info),
                qos, raw=True))
        self.create_service(Trigger, "~/start_episode", self._on_start)
        self.create_service(Trigger, "~/stop_episode", self._on_stop)
        self.get_logger().info(f"recording contract '{self.contract.name}' topics {sorted(self.topics)} "
                               f"into {self.output_dir}")

    # -- episodes -------------------------------------------------------------------------------
    def start_episode(self) -> Path:
        if self.writer is not None:
            raise RuntimeError(f"an episode is already being recorded ({self.writer.path.name})")
        self.episode_count += 1
        name = f"{self.prefix}_{time.strftime('%Y%m%d-%H%M%S')}_{self.episode_count:03d}"
        writer = BagWriter(self.output_dir / name, storage=self.storage)
        for topic, (msg_type, _) in self.topics.items():
            writer.add_topic(topic, msg_type)
        writer.set_custom_data("contract", self.contract.name)
        writer.set_custom_data("recorded_by", "q_transformer_ros record")
        self.writer = writer
        for topic, (t, raw) in sorted(self.last_state.items(), key=lambda item: item[1][0]):
            writer.write_raw(topic, t, raw)  # the state in force when the episode starts (older than it)
        if self.last_instruction is not None and self.contract.instruction.topic:
            raw, _ = self.last_instruction  # latched: every episode bag starts with its instruction
            # (sim time: at its reception, not now, which may be after the episode's first frames' reception)
            when = self._now() if self._reception is None else min(self._now(), self._instruction_time)
            writer.write_raw(self.contract.instruction.topic, when, raw)
        self.get_logger().info(f"episode started: {writer.path}")
        return writer.path

    def arm_episode(self) -> None:
        """Start an episode at the next message on the instruction topic (a sim publishes one at every reset):
        in the callback itself, so nothing that follows the instruction is missed. Thread-safe: it only sets
        a flag the executor reads."""
        if not self.contract.instruction.topic:
            raise RuntimeError(f"contract '{self.contract.name}' has no instruction topic to start an episode on")
        self.armed = True

    def stop_episode(self) -> Path:
        if self.writer is None:
            raise RuntimeError("no episode is being recorded")
        if self._reception is not None:  # what arrived before the stop belongs to the episode
            self._handle_released(self._reception.flush())
            if self.writer is None:  # a success among them ended the episode already
                return self.finished[-1]
        writer, self.writer = self.writer, None
        fallback = str(self.get_parameter("instruction").value)
        text = self.last_instruction[1] if self.last_instruction is not None else fallback
        if text:
            writer.set_custom_data("instruction", text)
        if sum(writer.counts.values()) == 0:
            writer.abort()
            raise RuntimeError(f"episode {writer.path.name} received no messages on {sorted(self.topics)}; not saved")
        path = writer.close()
        self.finished.append(path)
        self.get_logger().info(f"episode saved: {path} ({sum(writer.counts.values())} messages)")
        return path

    # -- callbacks ------------------------------------------------------------------------------
    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_clock(self, msg: ClockMsg, info: Any) -> None:
        """A /clock sample, and every other one already queued: rclpy's executor takes one message per
        subscription per round, and /clock comes faster than the recorded topics; without draining, its
        queue would fall ever further behind them while the recorder is busy."""
        assert self._reception is not None
        samples = [(msg, info)]
        handle = getattr(self._clock_sub, "handle", None)
        if handle is not None:
            with handle:
                while (taken := handle.take_message(ClockMsg, False)) is not None:
                    samples.append(taken)
        for sample, sample_info in samples:
            sim_ns = sample.clock.sec * 1_000_000_000 + sample.clock.nanosec
            received = sample_info["received_timestamp"] or time.time_ns()
            self._handle_released(self._reception.on_clock(sim_ns, received))

    def _on_received(self, topic: str, role: str, raw: bytes, info: Any) -> None:
        if self._reception is None:
            self._on_message(topic, role, raw, self._now())
            return
        received = info["received_timestamp"] or time.time_ns()  # 0: the middleware does not stamp
        self._handle_released(self._reception.add(received, (topic, role, bytes(raw)), time.time_ns()))

    def _handle_released(self, released: Any) -> None:
        """Messages ``ReceptionTime`` let go, with their sim reception times (None: before any /clock
        sample, so the node clock's now)."""
        for t, (topic, role, raw) in released:
            self._on_message(topic, role, raw, self._now() if t is None else t)

    def _on_message(self, topic: str, role: str, raw: bytes, now: int) -> None:
        if role == "instruction":
            self.last_instruction = (bytes(raw), _decode_string(raw))
            self._instruction_time = now
            if self.armed and self.writer is None:
                self.armed = False
                try:
                    self.start_episode()  # writes this instruction first
                except (RuntimeError, OSError) as e:
                    self.get_logger().error(f"armed episode could not start: {e}")
                return
        if topic in self.state_topics:
            self.last_state[topic] = (now, bytes(raw))
        if self.writer is None:
            return
        self.writer.write_raw(topic, now, raw)
        if role == "success" and self.stop_on_success and _decode_bool(raw):
            # Only a True success ends the episode: simulators publish False every step.
            try:
                self.stop_episode()
            except RuntimeError as e:
                self.get_logger().error(str(e))

    def _on_start(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        return _answer(self.start_episode, response)

    def _on_stop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        return _answer(self.stop_episode, response)

    def destroy_node(self) -> None:
        """Save an episode still open before the node goes away (Ctrl-C must not lose a recording)."""
        if getattr(self, "writer", None) is not None:
            self.close()
        super().destroy_node()

    def close(self) -> None:
        """Save an episode still open (Ctrl-C ends the recording, it does not lose it)."""
        if self.writer is not None:
            try:
                self.stop_episode()
            except RuntimeError as e:
                self.get_logger().error(str(e))


def _answer(action: Callable[[], object], response: Trigger.Response) -> Trigger.Response:
    """Run a start/stop action for a Trigger service: its result (the bag path) or its error as the message."""
    try:
        response.message = str(action())
        response.success = True
    except (RuntimeError, OSError, ValueError) as e:
        response.success, response.message = False, str(e)
    return response


def _decode_string(raw: bytes) -> str:
    """std_msgs/String CDR -> text (4-byte encapsulation, uint32 length incl. NUL, bytes)."""
    data = bytes(raw)
    if len(data) < 8:
        return ""
    order = "little" if data[1] == 1 else "big"
    n = int.from_bytes(data[4:8], order)
    return data[8:8 + max(n - 1, 0)].decode("utf-8", errors="replace")


def _decode_bool(raw: bytes) -> bool:
    """std_msgs/Bool CDR -> value (4-byte encapsulation, then one byte)."""
    data = bytes(raw)
    return len(data) >= 5 and data[4] != 0


def main(args: list[str] | None = None) -> int:
    """``record --ros-args -p contract:=config/contract_ee_arm.yaml -p output_dir:=bags``."""
    if print_help_if_asked(args, USAGE, __doc__):
        return 0
    rclpy.init(args=args)
    return spin_node(EpisodeRecorder, "recorder")


if __name__ == "__main__":
    sys.exit(main())
