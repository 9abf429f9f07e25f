"""The end-to-end demo's hands on ROS: runs episodes against a running ``sim_node`` through its
parameters and ``~/reset`` service, records them with an in-process recorder, or watches a running
``policy_node`` act (``~/enable``, ``~/decision``).

Why a separate node in the demo process and not a script of service calls: the recorder must start
right after the sim's new instruction has reached it and stop right after the sim says the episode
is over, with no frame of the idle time between episodes in the bag. Both decisions are taken inside
executor callbacks, in the same single-threaded executor as the recorder, so they never race its
message callbacks. The main thread only asks for an episode and waits for its result.

Only this module (and the rest of ``q_transformer_ros/ros``) imports rclpy; the demo's stages call
:class:`RosSession` lazily.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.srv import SetParameters
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import SetBool, Trigger

from q_transformer_ros.contract import RobotContract
from q_transformer_ros.ros.conversions import group_outputs, message_class
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, RECORD_QOS, RECORD_RELIABLE_QOS

SIM = "/sim_node"
EXPERT = "/expert_node"
POLICY = "/policy_node"
STOP_DELAY_S = 0.05
"""Wait after ``episode_end`` before closing the bag: the sim's last frame/success of the same tick
may still be in flight; its next (idle) tick comes a whole control period later."""


QUIET_S = 1.0
"""After ``episode_end`` with fewer step messages than steps: stop once none came for this long."""
DRAIN_LIMIT_S = 5.0
"""Longest wait after ``episode_end`` for the episode's queued step messages to be taken."""
END_GRACE_S = 1.5
"""Without ``episode_end``, an episode whose success messages stopped this long ago is over."""


class DriverError(RuntimeError):
    """A service did not answer, refused a request, or an episode never ended; names node and service."""


@dataclass
class EpisodeOutcome:
    """What one episode driven through ROS produced."""

    task: str
    seed: int
    end_reason: str
    """``success`` or ``truncated`` (the sim's ``~/episode_end``)."""
    success: bool
    duration_s: float
    steps: int = 0
    """Control steps the sim took (one success message per step)."""
    bag: str | None = None
    """Recorded bag (recording only)."""
    values: list[float] = field(default_factory=list)
    """Predicted value of every commanded decision of the policy (closed loop only)."""
    frames: list[np.ndarray] = field(default_factory=list)
    """uint8 (H, W, 3) camera frames of the episode, when asked for (closed loop GIF)."""


class EpisodeDriver(Node):
    """Clients for the sim (and expert / policy) and the per-episode state machine."""

    def __init__(self, contract: RobotContract, recorder: Any | None = None, decision_cls: Any | None = None,
                 **kwargs: Any) -> None:
        super().__init__("demo_driver", **kwargs)
        self.contract = contract
        self.recorder = recorder
        self._lock = threading.Lock()
        self._sim_params = self.create_client(SetParameters, f"{SIM}/set_parameters")
        self._expert_params = self.create_client(SetParameters, f"{EXPERT}/set_parameters")
        self._reset = self.create_client(Trigger, f"{SIM}/reset")
        self._enable = self.create_client(SetBool, f"{POLICY}/enable")
        # Success before episode_end: when callbacks queue up, the executor serves subscriptions in
        # creation order, so an episode's steps are counted before its end is handled.
        if contract.success.topic:
            self.create_subscription(Bool, contract.success.topic, self._on_success, RECORD_RELIABLE_QOS)
        self.create_subscription(String, f"{SIM}/episode_end", self._on_end, RECORD_RELIABLE_QOS)
        self.create_subscription(String, f"{SIM}/task", self._on_task, INSTRUCTION_QOS)
        if decision_cls is not None:
            self.create_subscription(decision_cls, f"{POLICY}/decision", self._on_decision, RECORD_RELIABLE_QOS)
        cam = contract.cameras[0]
        self.create_subscription(Image, cam.topic, self._on_image, RECORD_QOS)  # every frame of the GIF
        self.create_subscription(String, contract.instruction.topic or "/instruction", self._on_instruction,
                                 INSTRUCTION_QOS)
        self.create_subscription(Float64MultiArray, f"{SIM}/observation", self._on_observation, DIAGNOSTIC_QOS)
        for group in group_outputs(contract):
            self.create_subscription(message_class(group.msg_type), group.topic, self._on_command, COMMAND_QOS)
        self.create_timer(0.01, self._on_timer)
        self.commands_seen = 0
        """Command messages seen on the contract's target topics (from the expert or the policy)."""
        self.frames_seen = 0
        """Camera frames seen (first camera)."""
        self.successes_seen = 0
        """Messages seen on the success topic (the sim publishes one per step)."""
        self.hand: np.ndarray | None = None
        """Latest hand position from the sim's observation."""
        # per-episode state (guarded by _lock; changed by the main thread only between episodes)
        self._phase = "idle"  # idle | await_start | running | stopping | done
        self._reset_sent_ns = 0
        """System time the current episode's reset was requested: step messages sent earlier are the last
        episode's."""
        self._episode_start_ns = 0
        """Send time of the sim's ``~/task`` message of this episode's reset (0 until it arrived here): the
        sim publishes it inside the reset, after every step of the last episode and before any of this one."""
        self._pending: list[tuple[int, bool]] = []
        """Step messages (send time, success) that came before the reset's ``~/task``: counted once it says
        which episode sent them."""
        self._record = False
        self._keep_frames = False
        self._end_reason = ""
        self._end_time = 0.0
        self._saw_success = False
        self._values: list[float] = []
        self._frames: list[np.ndarray] = []
        self._steps = 0
        self._max_steps = 0
        self._last_step_time = 0.0
        self._bag: str | None = None
        self._error: str | None = None
        self._done = threading.Event()
        self.last_instruction: str | None = None

    # -- callbacks (executor thread) ------------------------------------------------------------
    def _on_instruction(self, msg: String) -> None:
        self.last_instruction = msg.data

    def _on_success(self, msg: Bool, info: Any) -> None:
        self.successes_seen += 1
        with self._lock:
            if self._published_before_reset(info):
                return  # a step of the previous episode, still queued here (a sim on sim time runs ahead)
            sent = info.get("source_timestamp") or 0
            if sent and not self._episode_start_ns:
                # Sent after the reset was requested but maybe before the sim handled it: a sim on sim time
                # keeps stepping the last episode meanwhile (this counted 41-42 steps for 40 in the tests).
                self._pending.append((sent, bool(msg.data)))
                return
            self._count_step(bool(msg.data), known_episode=bool(sent))

    def _count_step(self, success: bool, known_episode: bool = True) -> None:
        """A step of this episode. ``known_episode``: its send time placed it after this episode's reset (else,
        without send times, only what arrives once the reset has been answered counts)."""
        phases = ("idle", "await_start", "running", "stopping") if known_episode else ("await_start", "running", "stopping")
        if self._phase in phases and self._reset_sent_ns:
            self._steps += 1
            self._last_step_time = time.monotonic()
        if success:
            self._saw_success = True

    def _on_task(self, msg: String, info: Any) -> None:
        """The sim's reset of this episode: from its send time on, step messages are this episode's."""
        with self._lock:
            sent = info.get("source_timestamp") or 0
            if not sent or self._episode_start_ns or self._published_before_reset(info):
                return
            self._episode_start_ns = sent
            pending, self._pending = self._pending, []
            for step_sent, success in pending:
                if step_sent >= sent:
                    self._count_step(success)

    def _on_observation(self, msg: Float64MultiArray) -> None:
        if len(msg.data) >= 3:
            self.hand = np.asarray(msg.data[:3], dtype=np.float64)

    def _on_command(self, msg: Any) -> None:
        self.commands_seen += 1

    def _on_decision(self, msg: Any) -> None:
        with self._lock:
            # from the reset's answer on: the policy answers the reset's frame as soon as it is enabled,
            # which may be before this driver's timer moved the episode to "running"
            if self._phase in ("await_start", "running") and msg.commanded:
                self._values.append(float(msg.value))

    def _on_image(self, msg: Image) -> None:
        self.frames_seen += 1
        with self._lock:
            if not (self._keep_frames and self._phase == "running"):
                return
        if msg.encoding != "rgb8":
            return
        frame = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.width, 3).copy()
        with self._lock:
            self._frames.append(frame)

    def _published_before_reset(self, info: Any) -> bool:
        """Sent (middleware source stamp, system clock) before this episode began: before the sim's reset
        once its ``~/task`` arrived here, before the reset was requested until then."""
        sent = info.get("source_timestamp") or 0
        return bool(sent) and sent < (self._episode_start_ns or self._reset_sent_ns)

    def _on_end(self, msg: String, info: Any) -> None:
        with self._lock:
            if self._published_before_reset(info):
                return
            if self._phase not in ("await_start", "running") or self._steps == 0:
                return
            self._end_reason = msg.data
            self._end_time = time.monotonic()
            self._phase = "stopping"

    def _on_timer(self) -> None:
        with self._lock:
            phase = self._phase
            if phase == "running" and self._steps and time.monotonic() - self._last_step_time > END_GRACE_S:
                # The sim stopped stepping but its episode_end never arrived (a reader matched late):
                # the success messages tell the outcome as well.
                if self._saw_success or self._steps >= self._max_steps:
                    self._end_reason = "success" if self._saw_success else "truncated"
                    self._end_time, self._phase = time.monotonic(), "stopping"
                    phase = "stopping"
        if phase == "await_start":
            self._maybe_start()
        elif phase == "stopping":
            self._maybe_stop()

    def _maybe_start(self) -> None:
        if self._record:
            assert self.recorder is not None
            writer = self.recorder.writer
            if writer is None:
                return  # the sim's new instruction has not reached the (armed) recorder yet
            self._bag = str(writer.path)
        with self._lock:
            self._phase = "running"

    def _maybe_stop(self) -> None:
        with self._lock:
            now = time.monotonic()
            waited, quiet = now - self._end_time, now - self._last_step_time
            # Every step's message taken? A sim on sim time runs ahead of a busy executor: the step messages
            # still queued here are taken first, and with them the recorder's frames and commands of those
            # steps (same executor, served in the same rounds). A lost message: wait until they stop coming.
            complete = self._saw_success if self._end_reason == "success" else self._steps >= self._max_steps
        if waited < STOP_DELAY_S or (not complete and quiet < QUIET_S and waited < DRAIN_LIMIT_S):
            return
        if self._record and self.recorder is not None and self.recorder.writer is not None:
            try:
                self._bag = str(self.recorder.stop_episode())
            except Exception as e:  # noqa: BLE001
                self._fail(f"recorder could not save the episode: {type(e).__name__}: {e}")
                return
        with self._lock:
            self._phase = "done"
        self._done.set()

    def _fail(self, message: str) -> None:
        with self._lock:
            self._error = message
            self._phase = "done"
        self._done.set()

    # -- service helpers (main thread) ----------------------------------------------------------
    def _call(self, client: Any, request: Any, what: str, timeout_s: float) -> Any:
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise DriverError(f"service {client.srv_name} ({what}) not available after {timeout_s:.0f} s")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        if not done.wait(timeout_s):
            raise DriverError(f"service {client.srv_name} ({what}) did not answer within {timeout_s:.0f} s")
        return future.result()

    def service_ready(self, what: str, timeout_s: float) -> bool:
        """True once the node ``what`` ('sim', 'expert', 'policy') offers its services (waits up to timeout_s)."""
        client = {"sim": self._reset, "expert": self._expert_params, "policy": self._enable}[what]
        return bool(client.wait_for_service(timeout_sec=timeout_s))

    def set_parameters(self, node: str, values: dict[str, Any], timeout_s: float = 10.0) -> None:
        client = {"sim": self._sim_params, "expert": self._expert_params}[node]
        request = SetParameters.Request()
        request.parameters = [Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        response = self._call(client, request, f"set {values}", timeout_s)
        for (name, value), result in zip(values.items(), response.results):
            if not result.successful:
                raise DriverError(f"{client.srv_name}: parameter {name} = {value!r} refused: {result.reason}")

    def enable_policy(self, on: bool, timeout_s: float = 10.0) -> None:
        response = self._call(self._enable, SetBool.Request(data=on), f"enable {on}", timeout_s)
        if not response.success:
            raise DriverError(f"{self._enable.srv_name}: {response.message}")

    # -- one episode ----------------------------------------------------------------------------
    def run_episode(self, task: str, seed: int, *, record: bool = False, policy: bool = False,
                    keep_frames: bool = False, max_steps: int = 150, timeout_s: float | None = None) -> EpisodeOutcome:
        """Reset the sim to (task, seed) and wait until it reports the episode's end.

        ``record``: bag the episode with the in-process recorder. ``policy``: the policy node acts
        (disabled during the reset, enabled right after, so its frame history starts fresh)."""
        if record and self.recorder is None:
            raise DriverError("run_episode(record=True) but the driver has no recorder")
        period = 1.0 / self.contract.control_rate_hz
        timeout_s = timeout_s if timeout_s is not None else 30.0 + 3.0 * max_steps * period
        if policy:
            self.enable_policy(False)
        self.set_parameters("sim", {"task": task, "seed": int(seed), "max_episode_steps": int(max_steps)})
        self._begin_episode(record, keep_frames, max_steps)
        if record:
            assert self.recorder is not None
            self.recorder.arm_episode()  # the bag starts with the reset's instruction, before its first frame
        start = time.monotonic()
        try:
            response = self._call(self._reset, Trigger.Request(), f"reset {task} seed {seed}", 60.0)
        except DriverError:
            if self.recorder is not None:
                self.recorder.armed = False
            raise
        if not response.success:
            if self.recorder is not None:
                self.recorder.armed = False
            raise DriverError(f"{self._reset.srv_name}: {response.message}")
        self._reset_answered()
        if policy:
            self.enable_policy(True)
        if not self._done.wait(timeout_s):
            with self._lock:
                phase, self._phase = self._phase, "idle"
            raise DriverError(f"episode {task} seed {seed} did not end within {timeout_s:.0f} s (phase {phase}); "
                              f"is {SIM} stepping? (see its log)")
        with self._lock:
            self._phase = "idle"
            if self._error is not None:
                raise DriverError(self._error)
            return EpisodeOutcome(task=task, seed=int(seed), end_reason=self._end_reason,
                                  success=self._end_reason == "success", duration_s=time.monotonic() - start,
                                  steps=self._steps, bag=self._bag, values=list(self._values),
                                  frames=list(self._frames))

    def _begin_episode(self, record: bool, keep_frames: bool, max_steps: int) -> None:
        """Fresh per-episode state, just before the reset is requested (its system time is the first boundary)."""
        with self._lock:
            self._phase, self._record, self._keep_frames = "idle", record, keep_frames
            self._end_reason, self._saw_success, self._error, self._bag = "", False, None, None
            self._values, self._frames, self._steps, self._max_steps = [], [], 0, int(max_steps)
            self._done.clear()
            self._reset_sent_ns, self._episode_start_ns, self._pending = time.time_ns(), 0, []

    def _reset_answered(self) -> None:
        with self._lock:
            # Only now: an episode_end of the previous episode is published before the sim answers the
            # reset; one still in flight is ignored because no step of this episode has been seen yet.
            self._phase = "await_start"

    def warm_up(self, task: str, seed: int, *, policy: bool = False, timeout_s: float = 120.0,
                alive: Any = None) -> float:
        """Prove the loop sim -> commander (expert or policy) -> sim is connected before anything counts.

        DDS discovery between freshly started processes can take many seconds on a loaded machine;
        an episode recorded before the expert has matched the sim has frames but no commands. So:
        reset the sim (not recorded), then wait until commands arrive here and, for the expert, the hand
        has moved. ``alive()`` is called while waiting (raises if a node died). Returns the seconds waited.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        if policy:
            self.enable_policy(False)
        self.set_parameters("sim", {"task": task, "seed": int(seed)})
        response = self._call(self._reset, Trigger.Request(), f"warm-up reset {task} seed {seed}", timeout_s)
        if not response.success:
            raise DriverError(f"{self._reset.srv_name}: {response.message}")
        if policy:
            self.enable_policy(True)
        first, first_frames, first_successes = self.commands_seen, self.frames_seen, self.successes_seen
        hand0 = None
        while time.monotonic() < deadline:
            if alive is not None:
                alive()
            if hand0 is None and self.hand is not None:
                hand0 = self.hand.copy()
            moved = policy or (hand0 is not None and self.hand is not None and float(np.abs(self.hand - hand0).max()) > 1e-3)
            if (self.commands_seen - first >= 3 and self.frames_seen - first_frames >= 3 and moved
                    and self.successes_seen - first_successes >= 3):
                if policy:
                    self.enable_policy(False)
                time.sleep(0.5)  # let every other reader of this process match the same writers
                return time.monotonic() - start
            time.sleep(0.05)
        raise DriverError(f"warm-up: no closed loop after {timeout_s:.0f} s: {self.commands_seen - first} commands "
                          f"seen on {[g.topic for g in group_outputs(self.contract)]}, "
                          f"{self.frames_seen - first_frames} frames, {self.successes_seen - first_successes} success messages, "
                          f"{'hand did not move' if hand0 is not None else f'no observation on {SIM}/observation'} "
                          f"(see the nodes' logs)")


def _prewarm_bag_writer(storage: str) -> None:
    """Open and drop one bag: the first open imports the storage plugin (about a second), which must
    not happen inside the executor while an episode is running (its callbacks would queue up)."""
    import tempfile  # noqa: PLC0415

    from q_transformer_ros.data.bag_writer import BagWriter  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="qtr-prewarm-") as tmp:
        BagWriter(Path(tmp) / "warm", storage=storage).abort()


class RosSession:
    """rclpy context on a chosen domain + executor thread running the driver (and a recorder).

    Use as a context manager; ``recorder_params`` (dict) adds an in-process ``EpisodeRecorder``."""

    def __init__(self, contract: RobotContract, contract_path: str | Path, domain_id: int,
                 recorder_params: dict[str, Any] | None = None, with_decisions: bool = False) -> None:
        self.contract = contract
        self.contract_path = str(contract_path)
        self.domain_id = int(domain_id)
        self.recorder_params = recorder_params
        self.with_decisions = with_decisions
        self.context: Context | None = None
        self.driver: EpisodeDriver | None = None
        self.recorder: Any = None
        self._executor: SingleThreadedExecutor | None = None
        self._thread: threading.Thread | None = None
        self.decisions_available = False

    def __enter__(self) -> "RosSession":
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        try:
            if self.recorder_params is not None:
                from q_transformer_ros.ros.recorder import EpisodeRecorder  # noqa: PLC0415

                params = {"contract": self.contract_path, **self.recorder_params}
                self.recorder = EpisodeRecorder(
                    context=self.context,
                    parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
                # one line per bag would tear the progress bar; the bag list is in the demo's record log
                self.recorder.get_logger().set_level(rclpy.logging.LoggingSeverity.WARN)
                _prewarm_bag_writer(self.recorder.storage)
            decision_cls = None
            if self.with_decisions:
                from q_transformer_ros.ros.policy_node import load_interfaces  # noqa: PLC0415

                decision_cls, _ = load_interfaces()
                self.decisions_available = decision_cls is not None
            self.driver = EpisodeDriver(self.contract, self.recorder, decision_cls, context=self.context)
            self._executor = SingleThreadedExecutor(context=self.context)
            self._executor.add_node(self.driver)
            if self.recorder is not None:
                self._executor.add_node(self.recorder)
            self._thread = threading.Thread(target=self._spin, name="demo-ros", daemon=True)
            self._thread.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _spin(self) -> None:
        assert self._executor is not None
        try:
            self._executor.spin()
        except Exception:  # noqa: BLE001 - shutdown from the main thread ends the spin
            pass

    def __exit__(self, *exc: Any) -> None:
        if self._executor is not None:
            self._executor.shutdown(timeout_sec=2.0)
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self.recorder is not None:
            self.recorder.close()
            self.recorder.destroy_node()
        if self.driver is not None:
            self.driver.destroy_node()
        if self.context is not None:
            rclpy.try_shutdown(context=self.context)
