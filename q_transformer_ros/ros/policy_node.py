"""The closed-loop Q-Transformer policy node (``ros2 run q_transformer_ros policy_node``).

Everything it needs comes from one checkpoint: the robot contract inside it names the cameras, the
instruction topic, the control rate, the action dims with their ranges and the topics/fields they are
commanded on. Parameters (``config/policy.yaml``) only override topics and rates.

Decision moments, and why: a step is a frame of the step camera (the contract's first camera),
thinned to the control rate by ``data.sync.DecisionClock``: the same rule by which the converter
pairs each recorded frame with the command that answers it, seen from the acting side. The
observation of a step is that frame plus every other camera's newest frame and every state input's
newest value at that moment (captured in the step camera's callback); the command is published when
the decision is done. State inputs (``contract.state_inputs``: a joint position by name, a pose
coordinate, any numeric field) are read out of their messages by ``data.messages.read_field``, the
function the converter reads them out of bags with; their topics are subscribed before the cameras', so
that a state message and a frame that arrive together are handled state first (rclpy's executor takes
ready subscriptions in creation order), as the recorder does. A timer at the
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

Safety: a command is published only from fresh frames and state (every camera and every state input
younger than ``max_frame_age_s``, checked before the decision and again at publish time; every state
value finite) and finite values (the decided action plus the
delta dims' bases, which must be finite and fresh too) and, unless the contract allows none, an
instruction. Otherwise, and on a NaN or an exception in
inference, or when disabled through ``~/enable``, the contract's stop behaviour is published once
(``zero``: one all-zero command on every output; ``hold``: nothing) and nothing more until inputs
are good again; the history is cleared then, because the model was never trained across a gap.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import rclpy
from rclpy.time import Time
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from rcl_interfaces.msg import SetParametersResult
from std_msgs.msg import String
from std_srvs.srv import SetBool

from q_transformer_ros.control.loop import (
    MAX_INSTRUCTION_CHARS, ControlLoop, LoopConfig, StepReport, check_beam_margin, decoding_for,
)
from q_transformer_ros.contract import CameraSpec, RobotContract
from q_transformer_ros.data.image import frame_from_msg
from q_transformer_ros.data.messages import JointNotInMessage, read_field
from q_transformer_ros.ros.conversions import OutputGroup, build_command, group_outputs, message_class
from q_transformer_ros.ros.params import contract_topic, declare, param, parse_pairs
from q_transformer_ros.ros.qos import COMMAND_QOS, DIAGNOSTIC_QOS, INSTRUCTION_QOS, SENSOR_QOS
from q_transformer_ros.ros.runner import print_help_if_asked, spin_node

NODE_NAME = "policy_node"
WARN_THROTTLE_S = 5.0
TORCH_THREADS_DEFAULT = 1
"""One intra-op thread, because the node never has the machine to itself: camera drivers, the robot's
own nodes (or the sim) share its cores. Idle PyTorch OpenMP workers spin between ops, so each extra
thread burns a core shared with those processes. Measured in the demo's closed loop on the 2-core VM
(tiny model, sim_node + policy_node + driver, 9 episodes): the node took ~100 % of a core with PyTorch's
default of 2 threads and ~50 % with 1, and the episodes ran a little faster (a 120-step episode 4.1 s
instead of 4.6 s); a decision alone (nothing else running) took 7.7 ms with 2 threads and 8.8 ms with 1.
Set 0 (PyTorch's default) or more for a large model on a CPU with cores to spare."""
MAX_SCORE_CANDIDATES = 32
"""Instructions one ~/score_instructions call may rank (each is embedded and scored in the call)."""


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


class _NodeLog:
    """The loop's log on the node's logger; a message repeated within WARN_THROTTLE_S is dropped.
    (One logging call site per severity: rclpy refuses a call site that changes severity.)"""

    def __init__(self, node: Node) -> None:
        self._logger = node.get_logger()
        self._last: dict[str, tuple[str, float]] = {}

    def _fresh(self, level: str, message: str) -> bool:
        now = time.monotonic()
        last = self._last.get(level)
        if last is not None and last[0] == message and now - last[1] < WARN_THROTTLE_S:
            return False
        self._last[level] = (message, now)
        return True

    def info(self, message: str) -> None:
        if self._fresh("info", message):
            self._logger.info(message)

    def warning(self, message: str) -> None:
        if self._fresh("warning", message):
            self._logger.warning(message)

    def error(self, message: str) -> None:
        if self._fresh("error", message):
            self._logger.error(message)


class _PolicyCore:
    """Everything the plain and the managed (lifecycle) policy node share; mixed into a Node class.

    A thin shell around ``control.loop.ControlLoop``: callbacks feed it, an inference thread steps it,
    and it hands back commands and step reports, which become ROS messages here. ``policy`` may be given
    directly (tests, benchmarks, embedding in another process); otherwise it is loaded from the
    ``checkpoint`` parameter. Any object with the QTransformerPolicy interface works.
    """

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        """Every parameter with its value and description; read-only unless honoured at run time."""
        d = lambda *a, **k: declare(self, *a, **k)  # noqa: E731
        d("checkpoint", "", "Checkpoint file (the robot contract comes from it). Ignored when a policy is passed in.")
        d("device", "auto", "Torch device: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1'.")
        d("torch_threads", TORCH_THREADS_DEFAULT, "PyTorch intra-op CPU threads of this process when the node loads "
                                                  "the checkpoint itself; 0 = PyTorch's default (one per core).")
        d("camera_topics", [], "Camera topic overrides as 'camera_name:=/topic' items; cameras not listed use "
                               "the contract's topic (relative to the node's namespace).")
        d("output_topics", [], "Command topic overrides as '/contract/topic:=/new/topic' items.")
        d("state_topics", [], "State input topic overrides as 'state_name:=/topic' items; inputs not listed use "
                              "the contract's topic (relative to the node's namespace).")
        d("instruction_topic", "", "Instruction topic override (std_msgs/String); empty = the contract's.")
        d("control_rate_hz", 0.0, "Decision rate override in Hz; 0 = the contract's control rate (recommended).")
        d("max_frame_age_s", 0.0, "Staleness limit in seconds for frames, state inputs and delta sources; 0 = the contract's "
                                  "max_frame_age_s. Can be changed at run time.", read_only=False)
        d("enable_on_start", True, "Command the robot from the start; false = wait for ~/enable (std_srvs/SetBool).")
        d("publish_decision", True, "Publish a q_transformer_ros/Decision on ~/decision every step (if built).")
        d("use_streaming", True, "Encode each frame once and cache its tokens (fast); false = re-encode the "
                                 "whole history every step.")
        d("use_header_stamps", True, "Frame and state age from the message's header stamp (capture time; messages "
                                     "without a header use their arrival); false = from the arrival time at this node.")
        d("warmup", True, "Run the model once at start so the first command is not slow.")
        d("backend", "torch", "What runs the streaming steps: 'torch' (eager, or compile_mode) or 'onnxruntime' "
                              "(ONNX files next to the checkpoint, exported at start when missing or stale).")
        d("onnx_providers", ["CPUExecutionProvider"], "onnxruntime execution providers in order of preference, "
                                                       "e.g. ['TensorrtExecutionProvider', 'CUDAExecutionProvider', "
                                                       "'CPUExecutionProvider'] (backend 'onnxruntime').")
        d("beam_width", 1, "Action decoding: 1 = greedy per dim (the Q-Transformer's); k > 1 = beam search keeping the "
                           "k best partial actions, the action with the highest last-dim Q wins (a cloning checkpoint's: "
                           "the most likely action); slower decisions (docs/policy_node.md).")
        d("beam_margin", 0.05, "With beam_width > 1: act on the beam's action only when its value beats the greedy "
                               "action's by more than this, else on the greedy action. 0.05 measured best (more "
                               "successes than greedy, a value that still ranks outcomes); -1 = always the beam's "
                               "action, whose value then no longer tells failing attempts apart. Not for cloning "
                               "checkpoints (their beam ranks by log-probability).",
          dynamic_typing=True)  # "beam_margin:=-1" or ":=0" on the command line arrive as integers
        d("max_instruction_chars", MAX_INSTRUCTION_CHARS, "Longer instructions are rejected with a warning (the "
                                                          "node does not command until a valid one arrives).")
        # dynamic typing: on the command line "compile_mode:=off" arrives as the YAML 1.1 boolean false
        d("compile_mode", "off", "torch.compile the streaming steps: 'off' (eager; also false), 'default' (also "
                                 "true), 'reduce-overhead' (CUDA graphs on a GPU), 'max-autotune', "
                                 "'max-autotune-no-cudagraphs'. Compiles during warm-up (CPU: 0.5-5 min, depending "
                                 "on model size and the inductor cache).", dynamic_typing=True)

    def _param(self, name: str) -> Any:
        return param(self, name)

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        for p in params:
            if p.name == "max_frame_age_s":
                value = float(p.value) if p.value is not None else 0.0
                if value < 0:
                    return SetParametersResult(successful=False, reason=f"max_frame_age_s {value} must be >= 0")
                loop = getattr(self, "loop", None)
                if loop is not None:
                    limit = value or self.contract.max_frame_age_s
                    loop.config = dataclasses.replace(loop.config, max_frame_age_s=limit)
                    self.max_frame_age_s = limit
                    self.get_logger().info(f"max_frame_age_s set to {limit} s")
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------------------------------
    # set-up and teardown
    # ------------------------------------------------------------------------------------------
    def _setup(self, policy: Any | None, enabled: bool, active: bool = True) -> None:
        """Load the policy, build the loop, create every subscription, publisher, service and the timer.

        Commands go out only while both ``enabled`` (``~/enable``) and ``active`` (lifecycle state).
        """
        p = self._param
        if policy is None:
            checkpoint = p("checkpoint")
            if not checkpoint:
                raise ValueError(f"node '{self.get_name()}': parameter 'checkpoint' is empty; give a checkpoint file")
            from q_transformer_ros.core.policy import QTransformerPolicy  # torch import only when needed

            self._set_torch_threads(int(p("torch_threads")))
            backend = p("backend")
            self.get_logger().info(f"loading checkpoint {checkpoint} on device '{p('device')}', backend '{backend}'")
            policy = QTransformerPolicy.from_checkpoint(checkpoint, device=p("device"), backend=backend,
                                                        onnx_providers=tuple(p("onnx_providers") or ()))
        self.policy = policy
        compile_mode = _compile_mode_param(p("compile_mode"))
        if compile_mode not in ("off", self._compile_mode()):  # a policy passed in compiled stays compiled
            self.policy.set_compile_mode(compile_mode)
        self.contract: RobotContract = policy.contract
        c = self.contract
        self._entities: list[tuple[str, Any]] = []

        self.control_rate_hz = float(p("control_rate_hz")) or c.control_rate_hz
        self.max_frame_age_s = float(p("max_frame_age_s")) or c.max_frame_age_s
        self.use_header_stamps = bool(p("use_header_stamps"))
        if abs(self.control_rate_hz - c.control_rate_hz) > 1e-6:
            self.get_logger().warning(
                f"control rate overridden to {self.control_rate_hz} Hz; the model was trained at "
                f"{c.control_rate_hz} Hz (contract '{c.name}'): its frame history spans a different time"
            )
        camera_topics = parse_pairs(p("camera_topics"), "camera_topics")
        unknown = set(camera_topics) - {cam.name for cam in c.cameras}
        if unknown:
            raise ValueError(f"parameter 'camera_topics' names unknown cameras {sorted(unknown)}; contract '{c.name}' has {[x.name for x in c.cameras]}")
        state_topics = parse_pairs(p("state_topics"), "state_topics")
        unknown = set(state_topics) - {s.name for s in c.state_inputs}
        if unknown:
            raise ValueError(f"parameter 'state_topics' names unknown state inputs {sorted(unknown)}; contract "
                             f"'{c.name}' has {[s.name for s in c.state_inputs]}")
        output_remap = parse_pairs(p("output_topics"), "output_topics")
        unknown = set(output_remap) - {d.target.topic for d in c.action_dims}
        if unknown:
            raise ValueError(f"parameter 'output_topics' remaps topics {sorted(unknown)} that are no target in contract '{c.name}'")
        self.outputs: list[OutputGroup] = [
            OutputGroup(self.resolve_topic_name(contract_topic(g.topic)), g.contract_topic, g.msg_type, g.dims, g.refs)
            for g in group_outputs(c, output_remap)
        ]
        self._command_pubs: list[Any] = []
        self._closing = False
        beam_width = int(p("beam_width"))
        beam_margin, self.decoding = decoding_for(beam_width, check_beam_margin(p("beam_margin"), "parameter 'beam_margin'"),
                                                  getattr(policy, "beam_score", "q"))
        self.loop = ControlLoop(
            policy, LoopConfig(self.control_rate_hz, self.max_frame_age_s, bool(p("use_streaming")),
                               int(p("max_instruction_chars")), beam_width=beam_width, beam_margin=beam_margin),
            clock_ns=lambda: self.get_clock().now().nanoseconds, publish=self._publish_commands,
            report=self._publish_decision, log=_NodeLog(self), output_groups=[g.dims for g in self.outputs])
        self.loop.set_enabled(enabled)
        self.loop.set_active(active)

        # -- inputs (a SingleThreadedExecutor runs every callback: they only store) ----------------
        # state first: a state message and a frame ready together are then handled in that order
        self.state_topics: dict[str, str] = {}
        for topic, (msg_type, indices) in self._state_topic_groups(state_topics).items():
            self._track("subscription", self.create_subscription(
                message_class(msg_type), contract_topic(topic), self._make_state_callback(topic, indices), SENSOR_QOS))
            for i in indices:
                self.state_topics[c.state_inputs[i].name] = self.resolve_topic_name(contract_topic(topic))
        self.camera_topics: dict[str, str] = {}
        for cam in c.cameras:
            topic = contract_topic(camera_topics.get(cam.name, cam.topic))
            self._track("subscription", self.create_subscription(
                message_class(cam.msg_type), topic, self._make_image_callback(cam, topic), SENSOR_QOS))
            self.camera_topics[cam.name] = self.resolve_topic_name(topic)
        instruction_topic = p("instruction_topic") or c.instruction.topic
        self.instruction_topic = self.resolve_topic_name(contract_topic(instruction_topic)) if instruction_topic else ""
        if instruction_topic:
            self._track("subscription", self.create_subscription(
                String, contract_topic(instruction_topic), self._on_instruction, INSTRUCTION_QOS))
        for topic, (msg_type, dims) in self._source_topics().items():
            self._track("subscription", self.create_subscription(
                message_class(msg_type), contract_topic(topic), self._make_source_callback(dims), SENSOR_QOS))

        # -- outputs -------------------------------------------------------------------------------
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
                self._track("service", self.create_service(self._score_cls, "~/score_instructions", self._on_score))
                diagnostics_off = ""
            except Exception as e:  # noqa: BLE001 - e.g. overlay on PYTHONPATH but not on LD_LIBRARY_PATH
                self._decision_pub = None
                diagnostics_off = f"q_transformer_ros msg/srv found but unusable ({str(e).splitlines()[0]}; source scripts/ros_env.sh?)"
        if diagnostics_off:
            self.get_logger().warning(f"{diagnostics_off}: diagnostics are off (no ~/decision topic, no ~/score_instructions service)")
        self._track("service", self.create_service(SetBool, "~/enable", self._on_enable))

        self._start_inference_thread(warmup=bool(p("warmup")))
        self._track("timer", self.create_timer(1.0 / self.control_rate_hz, self._on_timer))
        self.get_logger().info(
            f"contract '{c.name}': cameras {self.camera_topics} (decisions on '{c.cameras[0].name}' frames), "
            f"state inputs {self.state_topics or 'none'}, "
            f"instruction topic {self.instruction_topic}, outputs "
            f"{[(g.topic, g.msg_type.split('/')[-1]) for g in self.outputs]}, "
            f"{self.control_rate_hz} Hz, max frame age {self.max_frame_age_s} s, stop '{c.stop_behaviour}', "
            f"decoding: {self.decoding}, "
            f"{'commanding' if enabled and active else 'not commanding yet (~/enable true, or activate when managed)'}"
        )

    def _set_torch_threads(self, threads: int) -> None:
        """Intra-op threads for the model this node owns (see ``TORCH_THREADS_DEFAULT`` for why 1)."""
        import torch  # noqa: PLC0415

        if threads < 0:
            raise ValueError(f"node '{self.get_name()}': parameter 'torch_threads' = {threads} must be >= 0")
        if threads:
            torch.set_num_threads(threads)
        self.get_logger().info(f"torch: {torch.get_num_threads()} intra-op CPU thread(s) (parameter torch_threads = {threads})")

    def _track(self, kind: str, entity: Any) -> Any:
        self._entities.append((kind, entity))
        return entity

    def _teardown(self) -> None:
        """Destroy everything ``_setup`` created (managed node: cleanup / shutdown)."""
        self._stop_inference_thread()
        if getattr(self, "loop", None) is not None:
            self.loop.close()
        destroy = {"subscription": self.destroy_subscription, "publisher": self.destroy_publisher,
                   "service": self.destroy_service, "timer": self.destroy_timer}
        for kind, entity in reversed(getattr(self, "_entities", [])):
            destroy[kind](entity)
        self._entities = []
        self._decision_pub = None
        self._command_pubs = []

    # ------------------------------------------------------------------------------------------
    # input callbacks: only store (the loop decides what is a decision moment)
    # ------------------------------------------------------------------------------------------
    def _make_image_callback(self, cam: CameraSpec, topic: str) -> Callable[[Any], None]:
        where = f"camera '{cam.name}' on {topic}"

        def on_image(msg: Any) -> None:
            now_ns = self.get_clock().now().nanoseconds
            try:
                image = frame_from_msg(msg, cam, where=where)
            except Exception as e:  # noqa: BLE001 - a bad frame must never take the node down
                n = self.loop.on_bad_frame(cam.name)
                self.get_logger().warning(f"dropping frame ({n} dropped so far): {e}",
                                          throttle_duration_sec=WARN_THROTTLE_S)
                return
            if self.loop.on_frame(cam.name, image, self._stamp_ns(msg, now_ns, where), now_ns):
                self._request_step(decision=True)

        return on_image

    def _stamp_ns(self, msg: Any, now_ns: int, where: str) -> int:
        """When ``msg`` was captured: its header stamp (``use_header_stamps``, never later than now), else
        its arrival ``now_ns`` (no header, a zero stamp, or one in the future: another clock)."""
        header = getattr(msg, "header", None)
        if not self.use_header_stamps or header is None:
            return now_ns
        header_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        if header_ns <= 0:
            return now_ns
        if header_ns - now_ns > self.max_frame_age_s * 1e9:
            self.get_logger().warning(
                f"{where}: header stamp is {(header_ns - now_ns) / 1e9:.3f} s in the future (clock "
                f"mismatch? use_sim_time?); using arrival time", throttle_duration_sec=WARN_THROTTLE_S)
            return now_ns
        return min(header_ns, now_ns)

    def _state_topic_groups(self, overrides: dict[str, str]) -> dict[str, tuple[str, list[int]]]:
        """Topic -> (message type, indices of the state inputs read from it), after ``state_topics`` overrides."""
        out: dict[str, tuple[str, list[int]]] = {}
        for i, spec in enumerate(self.contract.state_inputs):
            topic = overrides.get(spec.name, spec.source.topic)
            msg_type, indices = out.setdefault(topic, (spec.source.msg_type, []))
            if msg_type != spec.source.msg_type:
                raise ValueError(f"state input '{spec.name}': topic {topic} has type {spec.source.msg_type} but "
                                 f"another state input reads it as {msg_type}")
            indices.append(i)
        return out

    def _make_state_callback(self, topic: str, indices: list[int]) -> Callable[[Any], None]:
        """Reads every state input of one topic out of each message (``read_field``, as the converter does)
        and hands the values to the loop. A joint missing from a message is skipped (arm and gripper may
        come as separate JointState messages); any other unreadable field is warned about, and the loop
        stops when the input goes stale."""
        specs = [(i, self.contract.state_inputs[i]) for i in indices]
        where = f"state topic {topic}"

        def on_state(msg: Any) -> None:
            now_ns = self.get_clock().now().nanoseconds
            stamp_ns = self._stamp_ns(msg, now_ns, where)
            for i, spec in specs:
                try:
                    value = float(read_field(msg, spec.source))
                except JointNotInMessage:
                    continue
                except Exception as e:  # noqa: BLE001 - a malformed message must not take the node down
                    self.get_logger().warning(f"cannot read state input '{spec.name}': {e}",
                                              throttle_duration_sec=WARN_THROTTLE_S)
                    continue
                self.loop.on_state(i, value, stamp_ns, now_ns)  # NaN / inf are kept: the loop stops on them

        return on_state

    def _on_instruction(self, msg: String) -> None:
        text = msg.data
        self.loop.set_instruction(text)  # embedding, when needed, happens off this thread
        self.get_logger().info(f"instruction: {text[:200]!r}{'...' if len(text) > 200 else ''}")

    def _source_topics(self) -> dict[str, tuple[str, list[int]]]:
        out: dict[str, tuple[str, list[int]]] = {}
        for i in self.loop.delta_dims:
            src = self.contract.action_dims[i].source
            out.setdefault(src.topic, (src.msg_type, []))[1].append(i)
        return out

    def _make_source_callback(self, dims: list[int]) -> Callable[[Any], None]:
        def on_source(msg: Any) -> None:
            now_ns = self.get_clock().now().nanoseconds
            for i in dims:
                try:
                    value = float(read_field(msg, self.contract.action_dims[i].source))
                except Exception as e:  # noqa: BLE001
                    self.get_logger().warning(f"cannot read the base of delta dim '{self.contract.action_dims[i].name}': {e}",
                                              throttle_duration_sec=WARN_THROTTLE_S)
                    continue
                self.loop.on_source(i, value, now_ns)  # NaN / inf are kept: the loop stops on them

        return on_source

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        decide_now = self.loop.set_enabled(bool(request.data))
        response.success = True
        response.message = "enabled" if request.data else "disabled: stop sent, no further commands"
        self.get_logger().info(f"~/enable: {response.message}")
        # the stop goes out now, not at the next frame; enabled, a frame that came while disabled is
        # answered now if it is young enough (ControlLoop._decide_on_allow)
        self._request_step(decision=decide_now)
        return response

    # ------------------------------------------------------------------------------------------
    # the inference thread
    # ------------------------------------------------------------------------------------------
    def _start_inference_thread(self, warmup: bool) -> None:
        """Start the thread that runs every control step; with ``warmup``, it first runs the policy's
        warm-up (compiling the steps when ``compile_mode`` is set) and this waits for it. On that thread,
        because CUDA graphs are recorded per thread: a warm-up elsewhere would be recorded again at the
        first real step."""
        self._tick_wanted = threading.Event()
        self._inference_done = threading.Event()
        self._tick_lock = threading.Lock()  # one step at a time (control, scoring, lifecycle stops)
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
            self.policy.reset(self.loop.active_instruction)  # the warm-up left frames in the history
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
        """Wake the inference thread (executor side: never waits for it)."""
        if self.loop.request_step(decision):
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
            self._tick_wanted.clear()
            decision = self.loop.take_request()
            try:
                with self._tick_lock:
                    self.loop.step(decision)
            except Exception as e:  # noqa: BLE001 - the thread must outlive any one step
                self.get_logger().error(f"control step raised outside its guard: {type(e).__name__}: {e}",
                                        throttle_duration_sec=WARN_THROTTLE_S)
            finally:
                self.loop.end_step()

    # ------------------------------------------------------------------------------------------
    # outputs
    # ------------------------------------------------------------------------------------------
    def _publish_commands(self, values: np.ndarray, time_ns: int, groups: list[int]) -> None:
        """The loop's publish callback: one message per output group listed (values are finite)."""
        if self._closing or not rclpy.ok(context=self.context) or not self._command_pubs:
            raise RuntimeError("node shutting down: publishers are gone")
        stamp = Time(nanoseconds=time_ns, clock_type=self.get_clock().clock_type).to_msg()
        period = 1.0 / self.control_rate_hz
        for g in groups:
            group = self.outputs[g]
            self._command_pubs[g].publish(build_command(group, [float(values[i]) for i in group.dims], stamp, period))

    def _publish_decision(self, report: StepReport) -> None:
        if self._decision_pub is None or self._closing:
            return
        msg = self._decision_cls()
        msg.header.stamp = Time(nanoseconds=report.time_ns, clock_type=self.get_clock().clock_type).to_msg()
        msg.instruction = self.loop.active_instruction or ""
        msg.dim_names = [d.name for d in self.contract.action_dims]
        msg.camera_names = [cam.name for cam in self.contract.cameras]
        frames = report.frames
        msg.frame_age_s = [
            float((report.time_ns - frames[cam.name].stamp_ns) / 1e9) if cam.name in frames else float("inf")
            for cam in self.contract.cameras
        ]
        if hasattr(msg, "frame_stamps"):
            for cam in self.contract.cameras:
                stamp = type(msg.header.stamp)()
                if cam.name in frames:
                    stamp.sec, stamp.nanosec = divmod(frames[cam.name].stamp_ns, 1_000_000_000)
                msg.frame_stamps.append(stamp)
        if hasattr(msg, "state_names"):
            self._fill_decision_state(msg, report)
        if hasattr(msg, "stop_reason"):
            msg.stop_reason = report.stop_reason or ""
        msg.commanded = report.commanded
        decision = report.decision
        if decision is not None:
            msg.bins = [int(b) for b in np.asarray(decision.bins).reshape(-1)]
            msg.action = [float(a) for a in np.asarray(decision.action).reshape(-1)]
            msg.q_values = [float(q) for q in np.asarray(decision.q_values).reshape(-1)]
            msg.value = float(decision.value)
            msg.inference_time_s = float(decision.inference_time_s)
        self._decision_pub.publish(msg)

    def _fill_decision_state(self, msg: Any, report: StepReport) -> None:
        """The state inputs the step used (raw values, ages and stamps, contract order; NaN and inf
        ages where an input had no value yet), so a run can be checked against the dataset it records."""
        msg.state_names = [s.name for s in self.contract.state_inputs]
        for spec in self.contract.state_inputs:
            v = report.states.get(spec.name)
            stamp = type(msg.header.stamp)()
            if v is not None:
                stamp.sec, stamp.nanosec = divmod(v.stamp_ns, 1_000_000_000)
            msg.state.append(float(v.value) if v is not None else float("nan"))
            msg.state_age_s.append(float((report.time_ns - v.stamp_ns) / 1e9) if v is not None else float("inf"))
            msg.state_stamps.append(stamp)

    # ------------------------------------------------------------------------------------------
    # state for tests and diagnostics
    # ------------------------------------------------------------------------------------------
    @property
    def stop_reason(self) -> str | None:
        """Why the node is not commanding now (None while it is): what the last stop was entered for."""
        return self.loop.stop_reason

    @property
    def decisions(self) -> int:
        """Decisions that produced a command."""
        return self.loop.counters.decisions

    @property
    def stops(self) -> int:
        """Stop behaviours published (or, for 'hold', entered)."""
        return self.loop.counters.stops

    @property
    def overruns(self) -> int:
        """Decision moments that found the previous control step still running (model too slow)."""
        return self.loop.counters.overruns

    @property
    def _bad_frames(self) -> dict[str, int]:
        """Frames per camera that could not be decoded."""
        return self.loop.counters.bad_frames

    @property
    def _received(self) -> dict[str, int]:
        """Frames received per camera (decoded or not)."""
        return self.loop.counters.received

    # ------------------------------------------------------------------------------------------
    # scoring service (shares the model with the control step)
    # ------------------------------------------------------------------------------------------
    def _on_score(self, request: Any, response: Any) -> Any:
        candidates = list(request.instructions)
        response.instructions = candidates
        if not candidates or len(candidates) > MAX_SCORE_CANDIDATES:
            response.success = False
            response.message = ("no instructions given" if not candidates else
                                f"give at most {MAX_SCORE_CANDIDATES} instructions (got {len(candidates)})")
            return response
        too_long = [t for t in candidates if len(t) > self.loop.config.max_instruction_chars]
        if too_long:
            response.success = False
            response.message = (f"{len(too_long)} instruction(s) longer than max_instruction_chars "
                                f"{self.loop.config.max_instruction_chars}")
            return response
        unknown = [t for t in candidates if hasattr(self.policy, "is_embedded") and not self.policy.is_embedded(t)]
        if unknown:
            # the text model may not even be built yet: embed off this thread, answer now
            for text in unknown:
                self.loop.embed_in_background(text)
            response.success = False
            response.message = (f"embedding {len(unknown)} new instruction(s) in the background (the first one "
                                f"builds the text model: seconds on a CPU); call again shortly")
            return response
        with self._tick_lock:
            return self._score(candidates, response)

    def _score(self, candidates: list[str], response: Any) -> Any:
        now_ns = self.get_clock().now().nanoseconds
        frames = self.loop.frames()
        reason = self.loop.camera_problem(now_ns, frames) if frames else "no frames received yet"
        if reason is None and getattr(self.policy, "history_length", 1) == 0:
            reason = "no control step has run on the current frames yet (disabled, stale or just started)"
        if reason is not None:
            response.success, response.message = False, f"cannot score: {reason}"
            return response
        try:
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
        self._stop_inference_thread()  # waits for a running control step; no step starts after this
        try:
            loop = getattr(self, "loop", None)
            if loop is not None and not loop.stopped and self._command_pubs and rclpy.ok(context=self.context):
                got = self._tick_lock.acquire(timeout=2.0)
                try:
                    loop.stop("node shutting down")
                finally:
                    if got:
                        self._tick_lock.release()
        except Exception:  # noqa: BLE001 - shutdown must not raise
            pass
        self._closing = True
        if getattr(self, "loop", None) is not None:
            self.loop.close()
        super().destroy_node()


class PolicyNode(_PolicyCore, Node):
    """Runs a QTransformerPolicy on live camera frames and commands the robot per its contract.

    Starts commanding at once (``enable_on_start``); see ``ManagedPolicyNode`` for the lifecycle
    variant. ``policy`` may be passed in instead of the ``checkpoint`` parameter (tests, benchmarks).
    """

    def __init__(self, policy: Any | None = None, *, node_name: str = NODE_NAME, **node_kwargs: Any) -> None:
        Node.__init__(self, node_name, **node_kwargs)
        self._declare_parameters()
        self.add_on_set_parameters_callback(self._on_set_parameters)
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
        self.add_on_set_parameters_callback(self._on_set_parameters)
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
        if self.loop.set_active(True):
            self._request_step(decision=True)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.loop.set_active(False)
        # Send the stop now rather than at the next tick, so it is out before the transition returns.
        with self._tick_lock:
            self.loop.stop("deactivated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if getattr(self, "_command_pubs", None):
            with self._tick_lock:
                self.loop.stop("shutdown")
        self._teardown()
        return TransitionCallbackReturn.SUCCESS


def main(args: list[str] | None = None) -> int:
    """Entry point: ``policy_node [--managed] --ros-args -p checkpoint:=model.pt [--params-file config/policy.yaml]``.

    ``--managed`` (before ``--ros-args``) starts the lifecycle variant, which waits for
    configure / activate transitions.
    """
    usage = ("policy_node [-h] [--managed] --ros-args -p checkpoint:=MODEL.pt [--params-file config/policy.yaml] "
             "[-r __ns:=/robot1]")
    if print_help_if_asked(args, usage, __doc__):
        return 0
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
