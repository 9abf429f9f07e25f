"""The closed-loop Q-Transformer policy node (``ros2 run q_transformer_ros policy_node``).

Everything it needs comes from one checkpoint: the robot contract inside it names the cameras, the
instruction topic, the control rate, the action dims with their ranges and the topics/fields they are
commanded on. Parameters (``config/policy.yaml``) only override topics and rates.

Decision moments, and why: a step is a frame of the step camera (the contract's first camera),
thinned to the control rate by ``data.sync.DecisionClock``: the same rule by which the converter
pairs each recorded frame with the command that answers it, seen from the acting side. The
observation of a step is that frame plus every other camera's newest frame at that moment (captured
in the step camera's callback); the command is published when the decision is done. A timer at the
control rate is only a watchdog: it stops the robot when inputs go stale (or a camera falls silent)
and never commands.

Threading, and why: the model runs on a dedicated inference thread, woken by the step camera's
decision frames; executor callbacks only store inputs (images replace the newest frame per camera:
latest wins, old frames are dropped, nothing queues behind the model). ``main`` spins a
SingleThreadedExecutor. Measured on the 2-core VM with a tiny model at 10 Hz (test harness, 6 s
windows): with the step in a timer callback on rclpy's MultiThreadedExecutor, the executor's own
Python loop took ~36 % of a core and, whenever its pool fell behind, re-yielded pending tasks in a hot
loop holding the GIL that every torch op gives up and must take back, so a 20 ms decision took 1-4 s
and the node stopped for staleness; with the inference thread and a single-threaded executor the
executor took ~23 % and the slowest frame encode 25 ms. Each decision pushes the newest frame of every
camera into the policy once, so the frame history advances one frame per camera per control step, as
in the converted training data. A decision frame that arrives while the previous step still runs is
counted in ``overruns``; its step starts as soon as the running one ends (steps never queue up). The
scoring service runs the same model under the same lock, so the control loop pauses while it scores.

Safety: a command is published only from fresh frames (every camera younger than ``max_frame_age_s``,
checked before the decision and again at publish time) and finite values (the decided action plus the
delta dims' bases, which must be finite and fresh too) and, unless the contract allows none, an
instruction. Otherwise, and on a NaN or an exception in
inference, or when disabled through ``~/enable``, the contract's stop behaviour is published once
(``zero``: one all-zero command on every output; ``hold``: nothing) and nothing more until inputs
are good again; the history is cleared then, because the model was never trained across a gap.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.parameter import Parameter
from std_msgs.msg import String
from std_srvs.srv import SetBool

from q_transformer_ros.data.contract import CameraSpec, RobotContract
from q_transformer_ros.data.image import frame_from_msg
from q_transformer_ros.data.messages import read_field
from q_transformer_ros.data.sync import DecisionClock
from q_transformer_ros.ros.conversions import OutputGroup, build_command, group_outputs, message_class
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, SENSOR_QOS
from q_transformer_ros.ros.runner import spin_node

NODE_NAME = "policy_node"
WARN_THROTTLE_S = 5.0


def load_interfaces() -> tuple[Any, Any]:
    """(Decision msg class, ScoreInstructions srv class), or (None, None) on the pip path where the
    package's msg/ and srv/ were not built by colcon.

    When ``q_transformer_ros`` was imported from a source checkout while a colcon overlay is on
    ``sys.path`` (``source scripts/ros_env.sh``), the generated msg/ and srv/ live only in the
    overlay's copy of the package: that copy is added to the package's search path so both halves
    are found.
    """
    import q_transformer_ros

    for entry in sys.path:
        candidate = Path(entry or ".") / "q_transformer_ros"
        if (candidate / "msg" / "__init__.py").is_file() and str(candidate) not in q_transformer_ros.__path__:
            q_transformer_ros.__path__.append(str(candidate))
    try:
        from q_transformer_ros.msg import Decision as DecisionMsg  # type: ignore[attr-defined]
        from q_transformer_ros.srv import ScoreInstructions  # type: ignore[attr-defined]
    except ImportError:
        return None, None
    return DecisionMsg, ScoreInstructions


@dataclass
class _Frame:
    """The newest preprocessed frame of one camera."""

    image: np.ndarray
    """uint8 (3, H, W), already through the shared preprocessing (data.image.frame_from_msg)."""
    stamp_ns: int
    """Capture time (header stamp, node clock) or, without one, the time it arrived; nanoseconds."""
    received_ns: int
    """Time it arrived at this node (node clock), nanoseconds."""


@dataclass
class _SourceValue:
    """Latest measured value of a delta-mode dim's source field (the base the delta is added to)."""

    value: float
    received_ns: int


def _compile_mode_param(value: Any) -> str:
    """The ``compile_mode`` parameter as a mode name: booleans (``compile_mode:=off`` on the command line
    is YAML for false) map to "off" / "default"; anything else must be a string (checked by the policy)."""
    if value is None or value is False or value == "":
        return "off"
    if value is True:
        return "default"
    if not isinstance(value, str):
        raise ValueError(f"parameter 'compile_mode' = {value!r}: expected a mode name such as 'off' or 'default'")
    return value


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``['a:=b', 'c=d']`` -> ``{'a': 'b', 'c': 'd'}``; errors name the parameter and the item."""
    out: dict[str, str] = {}
    for item in items or []:
        sep = ":=" if ":=" in item else "="
        key, _, value = item.partition(sep)
        if not key.strip() or not value.strip():
            raise ValueError(f"parameter '{what}': item {item!r} is not of the form 'key:=value'")
        out[key.strip()] = value.strip()
    return out


class _PolicyCore:
    """Everything the plain and the managed (lifecycle) policy node share; mixed into a Node class.

    ``policy`` may be given directly (tests, benchmarks, embedding in another process); otherwise it
    is loaded from the ``checkpoint`` parameter. Any object with the QTransformerPolicy interface
    (``contract``, ``reset``, ``push_frames``, ``decide``, ``act``, ``score_instructions``, ``warmup``)
    works.
    """

    def _setup(self, policy: Any | None, enabled: bool, active: bool = True) -> None:
        """Load the policy and create every subscription, publisher, service and the timer.

        Commands go out only while both ``enabled`` (``~/enable``) and ``active`` (lifecycle state).
        """
        p = self._param
        if policy is None:
            checkpoint = p("checkpoint")
            if not checkpoint:
                raise ValueError(f"node '{self.get_name()}': parameter 'checkpoint' is empty; give a checkpoint file")
            from q_transformer_ros.core.policy import QTransformerPolicy  # torch import only when needed

            self.get_logger().info(f"loading checkpoint {checkpoint} on device '{p('device')}'")
            policy = QTransformerPolicy.from_checkpoint(checkpoint, device=p("device"))
        self.policy = policy
        compile_mode = _compile_mode_param(p("compile_mode"))
        if compile_mode not in ("off", self._compile_mode()):  # a policy passed in compiled stays compiled
            self.policy.set_compile_mode(compile_mode)
        self.contract: RobotContract = policy.contract
        c = self.contract
        self._entities: list[tuple[str, Any]] = []

        self.control_rate_hz = float(p("control_rate_hz")) or c.control_rate_hz
        self.max_frame_age_s = float(p("max_frame_age_s")) or c.max_frame_age_s
        self.use_streaming = bool(p("use_streaming"))
        self.use_header_stamps = bool(p("use_header_stamps"))
        if self.control_rate_hz <= 0 or self.max_frame_age_s <= 0:
            raise ValueError(f"control_rate_hz={self.control_rate_hz}, max_frame_age_s={self.max_frame_age_s}: must be > 0")
        if abs(self.control_rate_hz - c.control_rate_hz) > 1e-6:
            self.get_logger().warning(
                f"control rate overridden to {self.control_rate_hz} Hz; the model was trained at "
                f"{c.control_rate_hz} Hz (contract '{c.name}'): its frame history spans a different time"
            )
        camera_topics = _parse_pairs(p("camera_topics"), "camera_topics")
        unknown = set(camera_topics) - {cam.name for cam in c.cameras}
        if unknown:
            raise ValueError(f"parameter 'camera_topics' names unknown cameras {sorted(unknown)}; contract '{c.name}' has {[x.name for x in c.cameras]}")
        output_remap = _parse_pairs(p("output_topics"), "output_topics")
        unknown = set(output_remap) - {d.target.topic for d in c.action_dims}
        if unknown:
            raise ValueError(f"parameter 'output_topics' remaps topics {sorted(unknown)} that are no target in contract '{c.name}'")

        # -- state shared between threads (guarded by _lock) ---------------------------------------
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()  # the control step vs. lifecycle transitions sending a stop
        self._frames: dict[str, _Frame] = {}
        self._bad_frames: dict[str, int] = {cam.name: 0 for cam in c.cameras}
        self._received: dict[str, int] = {cam.name: 0 for cam in c.cameras}
        self._instruction: str | None = None
        self._instruction_changed = False
        self._instruction_error: str | None = None
        self._embed_lock = threading.Lock()
        self._sources: dict[int, _SourceValue] = {}
        # The pairing rule, live side (data/sync.py): the step camera's frames are the decision moments,
        # thinned to the control rate by the same DecisionClock the converter applies to bags; the other
        # cameras contribute their newest frame at that moment (captured in the step camera's callback).
        self._step_camera = c.cameras[0].name
        self._decision_clock = DecisionClock(int(round(1e9 / self.control_rate_hz)))
        self._decision_frames: dict[str, _Frame] | None = None
        self._decision_sources: dict[int, _SourceValue] = {}
        self._decision_pending = False
        self._enabled = bool(enabled)
        self._active = bool(active)

        # -- state of the inference thread only ----------------------------------------------------
        self._active_instruction: str | None = None
        self._history: dict[str, deque[np.ndarray]] = {cam.name: deque(maxlen=c.frame_history) for cam in c.cameras}
        self._stopped = True  # nothing commanded yet, so nothing to stop
        self._stop_reason = "not started"
        self.decisions = 0
        """Number of decisions that produced a command (for tests and diagnostics)."""
        self.stops = 0
        """Number of stop behaviours published (or, for 'hold', entered)."""

        # -- callback groups -----------------------------------------------------------------------
        self._image_group = ReentrantCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()  # the control timer only wakes the inference thread
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._service_group = MutuallyExclusiveCallbackGroup()  # scoring: embeds off the control loop

        # -- inputs --------------------------------------------------------------------------------
        self.camera_topics: dict[str, str] = {}
        for cam in c.cameras:
            topic = camera_topics.get(cam.name, cam.topic)
            self.camera_topics[cam.name] = topic
            self._track("subscription", self.create_subscription(
                message_class(cam.msg_type), topic, self._make_image_callback(cam, topic), SENSOR_QOS,
                callback_group=self._image_group,
            ))
        self.instruction_topic = p("instruction_topic") or c.instruction.topic
        if self.instruction_topic:
            self._track("subscription", self.create_subscription(
                String, self.instruction_topic, self._on_instruction, INSTRUCTION_QOS, callback_group=self._control_group))
        self._delta_dims = [i for i, d in enumerate(c.action_dims) if d.mode == "delta"]
        for topic, (msg_type, dims) in self._source_topics().items():
            self._track("subscription", self.create_subscription(
                message_class(msg_type), topic, self._make_source_callback(dims), SENSOR_QOS, callback_group=self._control_group))

        # -- outputs -------------------------------------------------------------------------------
        self.outputs: list[OutputGroup] = group_outputs(c, output_remap)
        self._command_pubs = [self._track("publisher", self.create_publisher(message_class(g.msg_type), g.topic, COMMAND_QOS))
                              for g in self.outputs]
        self._decision_cls, self._score_cls = load_interfaces()
        self._decision_pub = None
        diagnostics_off = "q_transformer_ros msg/srv interfaces are not built (pip install without colcon)"
        if self._decision_cls is not None:
            try:
                if p("publish_decision"):
                    self._decision_pub = self._track("publisher", self.create_publisher(
                        self._decision_cls, "~/decision", DIAGNOSTIC_QOS))
                self._track("service", self.create_service(
                    self._score_cls, "~/score_instructions", self._on_score, callback_group=self._service_group))
                diagnostics_off = ""
            except Exception as e:  # noqa: BLE001 - e.g. overlay on PYTHONPATH but not on LD_LIBRARY_PATH
                self._decision_pub = None
                diagnostics_off = f"q_transformer_ros msg/srv found but unusable ({str(e).splitlines()[0]}; source scripts/ros_env.sh?)"
        if diagnostics_off:
            self.get_logger().warning(f"{diagnostics_off}: diagnostics are off (no ~/decision topic, no ~/score_instructions service)")
        self._track("service", self.create_service(SetBool, "~/enable", self._on_enable, callback_group=self._control_group))

        self._start_inference_thread(warmup=bool(p("warmup")))
        self.policy.reset(self._fallback_instruction())
        self._track("timer", self.create_timer(1.0 / self.control_rate_hz, self._on_timer, callback_group=self._timer_group))
        self.get_logger().info(
            f"contract '{c.name}': cameras {self.camera_topics}, instruction topic {self.instruction_topic}, "
            f"outputs {[(g.topic, g.msg_type.split('/')[-1]) for g in self.outputs]}, {self.control_rate_hz} Hz, "
            f"max frame age {self.max_frame_age_s} s, stop '{c.stop_behaviour}', "
            f"{'commanding' if self._enabled and self._active else 'not commanding yet (~/enable true, or activate when managed)'}"
        )

    def _track(self, kind: str, entity: Any) -> Any:
        self._entities.append((kind, entity))
        return entity

    def _teardown(self) -> None:
        """Destroy everything ``_setup`` created (managed node: cleanup / shutdown)."""
        self._stop_inference_thread()
        destroy = {"subscription": self.destroy_subscription, "publisher": self.destroy_publisher,
                   "service": self.destroy_service, "timer": self.destroy_timer}
        for kind, entity in reversed(getattr(self, "_entities", [])):
            destroy[kind](entity)
        self._entities = []
        self._decision_pub = None
        self._command_pubs = []

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        def declare(name: str, default: Any, kind: int, description: str) -> None:
            self.declare_parameter(name, default, ParameterDescriptor(name=name, type=kind, description=description))

        S, D, B, SA = (ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_DOUBLE,
                       ParameterType.PARAMETER_BOOL, ParameterType.PARAMETER_STRING_ARRAY)
        declare("checkpoint", "", S, "Checkpoint file (the robot contract comes from it). Ignored when a policy is passed in.")
        declare("device", "auto", S, "Torch device: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1'.")
        declare("camera_topics", Parameter.Type.STRING_ARRAY, SA,
                "Camera topic overrides as 'camera_name:=/topic' items; cameras not listed use the contract's topic.")
        declare("output_topics", Parameter.Type.STRING_ARRAY, SA,
                "Command topic overrides as '/contract/topic:=/new/topic' items.")
        declare("instruction_topic", "", S, "Instruction topic override (std_msgs/String); empty = the contract's.")
        declare("control_rate_hz", 0.0, D, "Decision rate override in Hz; 0 = the contract's control rate (recommended).")
        declare("max_frame_age_s", 0.0, D, "Staleness limit override in seconds; 0 = the contract's max_frame_age_s.")
        declare("enable_on_start", True, B, "Command the robot from the start; false = wait for ~/enable (std_srvs/SetBool).")
        declare("publish_decision", True, B, "Publish a q_transformer_ros/Decision on ~/decision every step (if built).")
        declare("use_streaming", True, B,
                "Encode each frame once and cache its tokens (fast); false = re-encode the whole history every step.")
        declare("use_header_stamps", True, B,
                "Frame age from the image header stamp (capture time); false = from the arrival time at this node.")
        declare("warmup", True, B, "Run the model once at start so the first command is not slow.")
        # dynamic typing: on the command line "compile_mode:=off" arrives as the YAML 1.1 boolean false
        self.declare_parameter("compile_mode", "off", ParameterDescriptor(
            name="compile_mode", type=S, dynamic_typing=True,
            description="torch.compile the streaming steps: 'off' (eager; also false), 'default' (also true), "
                        "'reduce-overhead' (CUDA graphs on a GPU), 'max-autotune', 'max-autotune-no-cudagraphs'. "
                        "Compiles during warm-up (CPU: 0.5-5 min, depending on model size and the inductor cache)."))

    def _param(self, name: str) -> Any:
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # a list parameter left empty (YAML "[]" or not given)
            return None

    # ------------------------------------------------------------------------------------------
    # input callbacks (image group / control group): only store, never run the model
    # ------------------------------------------------------------------------------------------
    def _make_image_callback(self, cam: CameraSpec, topic: str) -> Callable[[Any], None]:
        where = f"camera '{cam.name}' on {topic}"
        is_step_camera = cam.name == self.contract.cameras[0].name

        def on_image(msg: Any) -> None:
            now_ns = self.get_clock().now().nanoseconds
            try:
                image = frame_from_msg(msg, cam, where=where)
            except Exception as e:  # noqa: BLE001 - a bad frame must never take the node down
                with self._lock:
                    self._bad_frames[cam.name] += 1
                    n = self._bad_frames[cam.name]
                self.get_logger().warning(f"dropping frame ({n} dropped so far): {e}",
                                          throttle_duration_sec=WARN_THROTTLE_S)
                return
            stamp_ns = now_ns
            if self.use_header_stamps:
                header_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
                if header_ns > 0:
                    if header_ns - now_ns > self.max_frame_age_s * 1e9:
                        self.get_logger().warning(
                            f"{where}: header stamp is {(header_ns - now_ns) / 1e9:.3f} s in the future (clock "
                            f"mismatch? use_sim_time?); using arrival time", throttle_duration_sec=WARN_THROTTLE_S)
                    else:
                        stamp_ns = min(header_ns, now_ns)
            with self._lock:
                self._received[cam.name] += 1
                current = self._frames.get(cam.name)
                if current is None or stamp_ns >= current.stamp_ns:  # reentrant group: never go back in time
                    self._frames[cam.name] = _Frame(image=image, stamp_ns=stamp_ns, received_ns=now_ns)
                decide = is_step_camera and self._decision_clock.offer(now_ns)
                if decide:  # the observation of this decision moment, and the delta dims' bases at it
                    self._decision_frames = dict(self._frames)
                    self._decision_sources = dict(self._sources)
            if decide:
                self._request_step(decision=True)

        return on_image

    def _on_instruction(self, msg: String) -> None:
        text = msg.data.strip() or None
        error = None
        if text is not None and hasattr(self.policy, "embed_instruction"):
            # Embed here, off the inference thread: an instruction unseen in training may need the
            # text model (built on first use), which must not stall the control loop.
            t0 = time.perf_counter()
            try:
                with self._embed_lock:
                    self.policy.embed_instruction(text)
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
                self.get_logger().error(f"instruction {text!r} on {self.instruction_topic} cannot be used, not commanding: {error}")
            else:
                if time.perf_counter() - t0 > 0.05:
                    self.get_logger().info(f"embedded instruction {text!r} in {time.perf_counter() - t0:.2f} s")
        with self._lock:
            if text != self._instruction or error != self._instruction_error:
                self._instruction = text
                self._instruction_error = error
                self._instruction_changed = True
        self.get_logger().info(f"instruction: {text!r}")

    def _source_topics(self) -> dict[str, tuple[str, list[int]]]:
        out: dict[str, tuple[str, list[int]]] = {}
        for i in self._delta_dims:
            src = self.contract.action_dims[i].source
            out.setdefault(src.topic, (src.msg_type, []))[1].append(i)
        return out

    def _make_source_callback(self, dims: list[int]) -> Callable[[Any], None]:
        def on_source(msg: Any) -> None:
            now_ns = self.get_clock().now().nanoseconds
            values = {}
            for i in dims:
                try:
                    values[i] = _SourceValue(float(read_field(msg, self.contract.action_dims[i].source)), now_ns)
                except Exception as e:  # noqa: BLE001
                    self.get_logger().warning(f"cannot read the base of delta dim '{self.contract.action_dims[i].name}': {e}",
                                              throttle_duration_sec=WARN_THROTTLE_S)
            with self._lock:
                self._sources.update(values)

        return on_source

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self._lock:
            self._enabled = bool(request.data)
        response.success = True
        response.message = "enabled" if request.data else "disabled: stop sent, no further commands"
        self.get_logger().info(f"~/enable: {response.message}")
        return response

    # ------------------------------------------------------------------------------------------
    # the control step (inference group)
    # ------------------------------------------------------------------------------------------
    def _fallback_instruction(self) -> str | None:
        return self.contract.instruction.fixed_text

    def _snapshot(self, decision: bool = False) -> tuple[dict[str, _Frame], str | None, bool, bool, dict[int, _SourceValue]]:
        """Inputs of a step: for a decision, the frames captured at its decision moment; else the newest."""
        with self._lock:
            at_decision = decision and self._decision_frames is not None
            frames = self._decision_frames if at_decision else self._frames
            sources = self._decision_sources if at_decision else self._sources
            changed, self._instruction_changed = self._instruction_changed, False
            if self._instruction_error is not None:
                instruction = None  # rejected: never condition on something else instead
            else:
                instruction = self._instruction if self._instruction is not None else self._fallback_instruction()
            return dict(frames), instruction, changed, self._enabled and self._active, dict(sources)

    def _stale_reason(self, now_ns: int, frames: dict[str, _Frame], instruction: str | None,
                      sources: dict[int, _SourceValue]) -> str | None:
        for cam in self.contract.cameras:
            f = frames.get(cam.name)
            if f is None:
                return f"no frame yet from camera '{cam.name}' ({self.camera_topics[cam.name]})"
            age = (now_ns - f.stamp_ns) / 1e9
            if age > self.max_frame_age_s:
                return f"camera '{cam.name}' ({self.camera_topics[cam.name]}) is stale: newest frame {age:.3f} s old > {self.max_frame_age_s} s"
        with self._lock:
            rejected = self._instruction_error
        if rejected is not None:
            return f"instruction {self._instruction!r} rejected ({rejected})"
        if instruction is None and not self.contract.instruction.allow_none:
            return f"no instruction received on {self.instruction_topic}"
        for i in self._delta_dims:
            s = sources.get(i)
            d = self.contract.action_dims[i]
            if s is None:
                return f"delta dim '{d.name}': no value yet on {d.source.topic} ({d.source.field})"
            if not math.isfinite(s.value):
                return f"delta dim '{d.name}': {d.source.topic} ({d.source.field}) is {s.value} (not finite)"
            age = (now_ns - s.received_ns) / 1e9
            if age > self.max_frame_age_s:
                return f"delta dim '{d.name}': {d.source.topic} is stale ({age:.3f} s)"
        return None

    def _start_inference_thread(self, warmup: bool) -> None:
        """Start the thread that runs every control step; with ``warmup``, it first runs the policy's
        warm-up (compiling the steps when ``compile_mode`` is set) and this waits for it. On that thread,
        because CUDA graphs are recorded per thread: a warm-up elsewhere would be recorded again at the
        first real step."""
        self.overruns = 0
        """Decision moments that found the previous control step still running (model too slow for the rate)."""
        self._tick_wanted = threading.Event()
        self._inference_done = threading.Event()
        self._in_step = False
        warmed, failure = threading.Event(), []

        def run() -> None:
            if warmup:
                t0 = time.perf_counter()
                mode = self._compile_mode()
                if mode != "off":
                    self.get_logger().info(f"warm-up compiles the policy's steps (compile_mode '{mode}'): minutes on a CPU")
                try:
                    self.policy.warmup()
                    # everything alive now (model, compiled graphs and their guards: ~720k objects when
                    # compiled) lives as long as the node: keep it out of the cyclic collector, whose full
                    # passes over it took 0.36-0.54 s (0.1 s eager) and stalled a control step by 0.63 s
                    gc.collect()
                    gc.freeze()
                    self.get_logger().info(f"warm-up took {time.perf_counter() - t0:.2f} s (compile_mode '{mode}')")
                except Exception as e:  # noqa: BLE001 - handed to _setup, which raises it
                    failure.append(e)
                    return
                finally:
                    warmed.set()
            self._inference_loop()

        self._inference_thread = threading.Thread(target=run, name=f"{self.get_name()}_inference", daemon=True)
        self._inference_thread.start()
        if warmup:
            warmed.wait()
            if failure:
                self._inference_thread.join()
                self._inference_thread = None
                raise failure[0]

    def _compile_mode(self) -> str:
        """The policy's compile mode ("off" for a policy object without compiled steps)."""
        return str(getattr(getattr(self.policy, "steps", None), "mode", "off"))

    def _stop_inference_thread(self) -> None:
        thread = getattr(self, "_inference_thread", None)
        if thread is None:
            return
        self._inference_done.set()
        self._tick_wanted.set()
        if thread is not threading.current_thread():
            thread.join(timeout=10.0)
        self._inference_thread = None
        gc.unfreeze()  # undo the warm-up's gc.freeze: the model may be dropped now (cleanup, exit)

    def _on_timer(self) -> None:
        """Watchdog at the control rate: checks inputs (staleness, enable) without deciding, so that a
        silent camera still gets its stop; decisions come from the step camera's frames."""
        self._request_step(decision=False)

    def _request_step(self, decision: bool) -> None:
        """Wake the inference thread (executor side: never waits for it). A decision requested while the
        previous step still runs is an overrun: it starts as soon as that step ends."""
        overran = False
        with self._lock:
            if decision:
                overran = self._in_step or self._decision_pending
                self.overruns += int(overran)
                self._decision_pending = True
        if overran:
            self.get_logger().warning(
                f"control step slower than {self.control_rate_hz} Hz ({self.overruns} overruns so far): the next "
                f"step starts when this one ends; a GPU, a smaller model or a lower control rate would keep up",
                throttle_duration_sec=WARN_THROTTLE_S)
        self._tick_wanted.set()

    def _inference_loop(self) -> None:
        while True:
            self._tick_wanted.wait()
            if self._inference_done.is_set():
                return
            with self._lock:
                self._in_step = True
                self._tick_wanted.clear()
                decision, self._decision_pending = self._decision_pending, False
            try:
                self._on_tick(decision)
            except Exception as e:  # noqa: BLE001 - the thread must outlive any one step
                self.get_logger().error(f"control step raised outside its guard: {type(e).__name__}: {e}",
                                        throttle_duration_sec=WARN_THROTTLE_S)
            finally:
                self._in_step = False

    def _on_tick(self, decision: bool = True) -> None:
        with self._tick_lock:
            self._tick(decision)

    def _tick(self, decision: bool = True) -> None:
        """One control step: ``decision`` = a decision moment (a step-camera frame); otherwise a watchdog
        check that stops on stale or missing inputs and never commands."""
        now = self.get_clock().now()
        now_ns = now.nanoseconds
        frames, instruction, changed, enabled, sources = self._snapshot(decision)
        try:
            if changed or instruction != self._active_instruction:
                self._reset(instruction, why="instruction changed")
            if not enabled:
                self._stop(now, "disabled (~/enable false or lifecycle inactive)")
                self._publish_decision(now, None, frames, commanded=False)
                return
            reason = self._stale_reason(now_ns, frames, instruction, sources)
            if reason is not None:
                self._stop(now, reason)
                self._publish_decision(now, None, frames, commanded=False)
                return
            if not decision:
                return  # watchdog: inputs are fine; the next step-camera frame decides
            if self._stopped:
                # Resuming after a gap (or starting): the model never saw histories with holes in them.
                self._reset(instruction, why=f"resuming after: {self._stop_reason}")
            decision = self._decide({name: f.image for name, f in frames.items()}, instruction)
            action = np.asarray(decision.action, dtype=np.float64)
            if action.shape != (self.contract.num_action_dims,) or not np.all(np.isfinite(action)) \
                    or not math.isfinite(float(decision.value)):
                raise FloatingPointError(f"non-finite or mis-shaped decision: action {action}, value {decision.value}")
            values = action.copy()
            for i in self._delta_dims:
                values[i] += sources[i].value
            if not np.all(np.isfinite(values)):
                raise FloatingPointError(f"non-finite command {values} (decided action {action} plus delta bases)")
            # Checked again at publish time: a slow decision must not send a command built from inputs
            # that went stale while it ran.
            published = self.get_clock().now()
            reason = self._stale_reason(published.nanoseconds, frames, instruction, sources)
            if reason is not None:
                self._stop(published, f"{reason} (at publish time, after a "
                                      f"{(published.nanoseconds - now_ns) / 1e9:.3f} s decision)")
                self._publish_decision(published, None, frames, commanded=False)
                return
            self._publish_commands(published, values)
        except Exception as e:  # noqa: BLE001 - a failed step must stop the robot, not the node
            if getattr(self, "_closing", False) or not rclpy.ok(context=self.context):
                return  # shutting down: publishers are gone, destroy_node sends the stop
            self.get_logger().error(f"control step failed, stopping: {type(e).__name__}: {e}",
                                    throttle_duration_sec=WARN_THROTTLE_S)
            try:
                self._stop(now, f"error: {type(e).__name__}")
                self._publish_decision(now, None, frames, commanded=False)
            except Exception as e2:  # noqa: BLE001
                self.get_logger().error(f"could not publish the stop: {type(e2).__name__}: {e2}",
                                        throttle_duration_sec=WARN_THROTTLE_S)
            return
        self._stopped = False
        self.decisions += 1
        self._publish_decision(now, decision, frames, commanded=True)

    def _decide(self, images: dict[str, np.ndarray], instruction: str | None) -> Any:
        for name, image in images.items():
            self._history[name].append(image)
        if self.use_streaming:
            self.policy.push_frames(images)
            return self.policy.decide()
        return self.policy.act({name: np.stack(list(h)) for name, h in self._history.items()}, instruction)

    def _reset(self, instruction: str | None, why: str) -> None:
        self.policy.reset(instruction)
        for h in self._history.values():
            h.clear()
        if instruction != self._active_instruction:
            self.get_logger().info(f"history cleared ({why}); conditioning on {instruction!r}")
        self._active_instruction = instruction

    def _stop(self, now: Any, reason: str) -> None:
        """Publish the contract's stop behaviour once after the last command; never a stale command."""
        if self._stopped:
            self._stop_reason = reason  # still stopped, maybe for another reason now: report the current one
            return
        self._stopped = True
        self._stop_reason = reason
        self.stops += 1
        if self.contract.stop_behaviour == "zero":
            skipped = self._publish_commands(now, self.stop_values(), finite_only=True)
            extra = f"; not sent on {skipped}: its delta base is not finite" if skipped else ""
            self.get_logger().warning(f"stop (zero command sent{extra}): {reason}")
        else:
            self.get_logger().warning(f"stop (hold: no command sent): {reason}")

    @property
    def stop_reason(self) -> str | None:
        """Why the node is not commanding now (None while it is): what the last stop was entered for."""
        return self._stop_reason if self._stopped else None

    def stop_values(self) -> np.ndarray:
        """The 'zero' stop: zero for absolute dims, the current measured value for delta dims (no motion)."""
        values = np.zeros(self.contract.num_action_dims, dtype=np.float64)
        with self._lock:
            for i in self._delta_dims:
                if i in self._sources:
                    values[i] = self._sources[i].value
        return values

    def _publish_commands(self, now: Any, values: np.ndarray, finite_only: bool = False) -> list[str]:
        """Publish one command per output; a non-finite value is never published (``finite_only``: such
        an output is skipped and named in the result; otherwise it is an error)."""
        stamp = now.to_msg()
        period = 1.0 / self.control_rate_hz
        skipped = []
        for group, pub in zip(self.outputs, self._command_pubs):
            group_values = [float(values[i]) for i in group.dims]
            if not all(math.isfinite(v) for v in group_values):
                if not finite_only:
                    raise FloatingPointError(f"non-finite command {group_values} for {group.topic}")
                skipped.append(group.topic)
                continue
            pub.publish(build_command(group, group_values, stamp, period))
        return skipped

    def _publish_decision(self, now: Any, decision: Any | None, frames: dict[str, _Frame], commanded: bool) -> None:
        if self._decision_pub is None:
            return
        msg = self._decision_cls()
        msg.header.stamp = now.to_msg()
        msg.instruction = self._active_instruction or ""
        msg.dim_names = [d.name for d in self.contract.action_dims]
        msg.camera_names = [cam.name for cam in self.contract.cameras]
        msg.frame_age_s = [
            float((now.nanoseconds - frames[cam.name].stamp_ns) / 1e9) if cam.name in frames else float("inf")
            for cam in self.contract.cameras
        ]
        if hasattr(msg, "frame_stamps"):
            for cam in self.contract.cameras:
                stamp = type(msg.header.stamp)()
                if cam.name in frames:
                    stamp.sec, stamp.nanosec = divmod(frames[cam.name].stamp_ns, 1_000_000_000)
                msg.frame_stamps.append(stamp)
        msg.commanded = commanded
        if decision is not None:
            msg.bins = [int(b) for b in np.asarray(decision.bins).reshape(-1)]
            msg.action = [float(a) for a in np.asarray(decision.action).reshape(-1)]
            msg.q_values = [float(q) for q in np.asarray(decision.q_values).reshape(-1)]
            msg.value = float(decision.value)
            msg.inference_time_s = float(decision.inference_time_s)
        self._decision_pub.publish(msg)

    # ------------------------------------------------------------------------------------------
    # scoring service (inference group: shares the model with the control step)
    # ------------------------------------------------------------------------------------------
    def _on_score(self, request: Any, response: Any) -> Any:
        if hasattr(self.policy, "embed_instruction"):
            try:  # embed unknown candidates before taking the control loop's lock
                with self._embed_lock:
                    for text in request.instructions:
                        self.policy.embed_instruction(text)
            except Exception as e:  # noqa: BLE001
                response.instructions = list(request.instructions)
                response.success, response.message = False, f"cannot embed instruction: {type(e).__name__}: {e}"
                return response
        with self._tick_lock:
            return self._score(request, response)

    def _score(self, request: Any, response: Any) -> Any:
        now_ns = self.get_clock().now().nanoseconds
        with self._lock:
            frames = dict(self._frames)
        candidates = list(request.instructions)
        response.instructions = candidates
        if not candidates:
            response.success, response.message = False, "no instructions given"
            return response
        reason = self._stale_reason(now_ns, frames, "", {}) if frames else "no frames received yet"
        if reason is None and not any(len(h) for h in self._history.values()):
            reason = "no control step has run on the current frames yet (disabled, stale or just started)"
        if reason is not None:
            response.success, response.message = False, f"cannot score: {reason}"
            return response
        try:
            if not self.use_streaming:
                # act() keeps no state: load the node's own history into the streaming cache to score.
                self.policy.reset(self._active_instruction)
                for step in range(len(next(iter(self._history.values())))):
                    self.policy.push_frames({name: h[step] for name, h in self._history.items()})
            values = np.asarray(self.policy.score_instructions(candidates), dtype=np.float64).reshape(-1)
            if values.shape != (len(candidates),) or not np.all(np.isfinite(values)):
                raise FloatingPointError(f"scores {values} for {len(candidates)} instructions")
        except Exception as e:  # noqa: BLE001
            self.get_logger().error(f"~/score_instructions failed: {type(e).__name__}: {e}")
            response.success, response.message = False, f"model error: {type(e).__name__}: {e}"
            return response
        newest = max(f.stamp_ns for f in frames.values())
        response.stamp.sec, response.stamp.nanosec = divmod(newest, 1_000_000_000)
        response.values = [float(v) for v in values]
        response.success, response.message = True, f"scored {len(candidates)} instructions"
        return response

    def destroy_node(self) -> None:
        """Send the stop behaviour if commands were being sent, then destroy."""
        self._closing = True
        self._stop_inference_thread()  # waits for a running control step; no step starts after this
        try:
            if not getattr(self, "_stopped", True) and getattr(self, "_command_pubs", None) and rclpy.ok(context=self.context):
                got = self._tick_lock.acquire(timeout=2.0)  # let a running control step finish first
                try:
                    self._stop(self.get_clock().now(), "node shutting down")
                finally:
                    if got:
                        self._tick_lock.release()
        except Exception:  # noqa: BLE001 - shutdown must not raise
            pass
        super().destroy_node()


class PolicyNode(_PolicyCore, Node):
    """Runs a QTransformerPolicy on live camera frames and commands the robot per its contract.

    Starts commanding at once (``enable_on_start``); see ``ManagedPolicyNode`` for the lifecycle
    variant. ``policy`` may be passed in instead of the ``checkpoint`` parameter (tests, benchmarks).
    """

    def __init__(self, policy: Any | None = None, *, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        Node.__init__(self, node_name, **node_kwargs)
        self._declare_parameters()
        try:
            self._setup(policy, enabled=bool(self._param("enable_on_start")))
        except BaseException:
            # a node that failed to start must not linger in the ROS graph (its name, its half-made topics)
            self._teardown()
            Node.destroy_node(self)
            raise


class ManagedPolicyNode(_PolicyCore, LifecycleNode):
    """The policy node as a ROS 2 managed (lifecycle) node.

    configure: load the checkpoint, create topics, services and the timer, warm up (no commands);
    activate: command the robot (if ``~/enable`` is true, which ``enable_on_start`` sets);
    deactivate: publish the stop behaviour once, then nothing; cleanup: destroy everything.
    """

    def __init__(self, policy: Any | None = None, *, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        LifecycleNode.__init__(self, node_name, **node_kwargs)
        self._declare_parameters()
        self._given_policy = policy

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._setup(self._given_policy, enabled=bool(self._param("enable_on_start")), active=False)
        except Exception as e:  # noqa: BLE001 - a failed configure is reported, the node stays unconfigured
            self.get_logger().error(f"configure failed: {type(e).__name__}: {e}")
            self._teardown()
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = True
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = False
        # Send the stop now rather than at the next tick, so it is out before the transition returns.
        with self._tick_lock:
            self._stop(self.get_clock().now(), "deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if getattr(self, "_command_pubs", None):
            with self._tick_lock:
                self._stop(self.get_clock().now(), "shutdown")
        self._teardown()
        return TransitionCallbackReturn.SUCCESS


def main(args: list[str] | None = None) -> int:
    """Entry point: ``policy_node [--managed] --ros-args -p checkpoint:=model.pt [--params-file config/policy.yaml]``.

    ``--managed`` (before ``--ros-args``) starts the lifecycle variant, which waits for
    configure / activate transitions.
    """
    argv = list(sys.argv if args is None else args)
    managed = "--managed" in argv[: argv.index("--ros-args")] if "--ros-args" in argv else "--managed" in argv
    if managed:
        argv.remove("--managed")
    # The inference thread gives up the GIL in every torch op and must take it back from the executor
    # thread; with Python's default 5 ms switch interval that wait cost several ms per decision
    # (docs/policy_node.md: camera-to-command p50 40 -> 30 ms at 1 ms).
    sys.setswitchinterval(float(os.environ.get("QTR_GIL_SWITCH_S", "0.001")))
    # Own signal handling: on Ctrl-C / SIGTERM the context must still be alive so that destroy_node can
    # send the stop behaviour to the robot before rclpy shuts down.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    return spin_node(ManagedPolicyNode if managed else PolicyNode, NODE_NAME, SingleThreadedExecutor())


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    raise SystemExit(main())
