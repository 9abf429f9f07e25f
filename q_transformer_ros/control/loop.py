"""The policy node's behaviour without ROS: what it commands, when it stops, and why.

``ControlLoop`` holds the inputs (newest frame per camera, newest value per state input, delta dims'
source values, instruction, enable and lifecycle state), the decision moments (the pairing rule's live side, ``DecisionClock``),
and the safety state machine. The node is a thin shell: its callbacks feed the loop, its inference
thread calls ``step``, and the loop hands commands, stops and reports back through callbacks. Tested
with a fake clock (``test/control/test_control_loop.py``), no DDS needed.

Rules the loop enforces, every step:

- a command is built only from inputs within their age limit (every camera frame, every state input,
  every delta dim's source value) and finite (the state inputs, the decided action, the sources, and
  their sum), checked before the
  decision and again at the moment the command is published: a slow decision never sends a command
  built from inputs that went stale while it ran;
- otherwise the contract's stop behaviour is sent once (``zero``: one all-zero command, delta dims
  holding their measured value; ``hold``: nothing), with the reason logged and reported, and nothing
  more until the inputs are good again (the policy's history is then restarted: the model never saw
  histories with holes);
- an instruction is used only once it is embedded; a new one is embedded off the control path (an
  embedding worker thread; the first unknown instruction builds the text model, seconds on a CPU) and
  the loop stops (``embedding instruction ...``) until it is ready; instructions longer than
  ``max_instruction_chars`` are rejected with a warning, and the loop stops until a valid one arrives.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from q_transformer_ros.contract import RobotContract
from q_transformer_ros.data.sync import DecisionClock
from q_transformer_ros.observation import Observation

NS = 1_000_000_000
MAX_INSTRUCTION_CHARS = 1000
"""Default limit on an instruction's length: CLIP-style text towers read 77 tokens (a few hundred
characters); a longer text is a mistake, and a megabyte string blocked tokenisation for 2.5 s."""


class Log(Protocol):
    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def error(self, message: str) -> None: ...


@dataclass
class Frame:
    """The newest preprocessed frame of one camera."""

    image: np.ndarray
    """uint8 (3, H, W), through the shared preprocessing (data.image.frame_from_msg)."""
    stamp_ns: int
    """Capture time (header stamp) or, without one, the time it arrived; nanoseconds."""
    received_ns: int
    """Time it arrived, nanoseconds (the node's clock)."""


@dataclass
class StateValue:
    """The newest value of one state input (the model's robot-state observation)."""

    value: float
    """Raw, in the source's units (NaN and inf are kept: the loop stops on them)."""
    stamp_ns: int
    """Header stamp of the message or, without one, the time it arrived; nanoseconds (ages count from it)."""
    received_ns: int
    """Time it arrived, nanoseconds (the node's clock)."""


@dataclass
class SourceValue:
    """Latest measured value of a delta dim's source field (the base the delta is added to)."""

    value: float
    received_ns: int


@dataclass(frozen=True)
class LoopConfig:
    control_rate_hz: float
    max_frame_age_s: float
    use_streaming: bool = True
    """True: encode each frame once and decide from cached tokens; False: full recomputation each step."""
    max_instruction_chars: int = MAX_INSTRUCTION_CHARS
    beam_width: int = 1
    """Action decoding: 1 = greedy, each dim's bin maximises its own Q given the dims before it (the
    Q-Transformer's decoding); k > 1 = beam search that keeps the k best partial actions and returns the
    one whose last-dim Q (the value of the whole action) is highest (for a cloning checkpoint the policy
    ranks by summed log-probability instead). Why offer it: a learned Q is not
    exactly consistent across dims (dim i's Q is only trained towards the max of dim i+1's), and greedy
    decoding follows each dim's error; benchmarks/README.md, "Learning, session 10"."""
    beam_margin: float | None = None
    """With ``beam_width`` > 1, a Q-Transformer acts on the beam's action only when its value beats the
    greedy action's by more than this, else on the greedy action (the node's default 0.05 measured best:
    more successes than greedy and a value that still ranks outcomes; benchmarks/README.md, "Learning,
    session 12"). None = always the beam's action (and what a cloning checkpoint's beam needs)."""

    def __post_init__(self) -> None:
        if not (self.control_rate_hz > 0 and math.isfinite(self.control_rate_hz)):
            raise ValueError(f"control_rate_hz = {self.control_rate_hz}: must be a finite number > 0")
        if not (self.max_frame_age_s > 0 and math.isfinite(self.max_frame_age_s)):
            raise ValueError(f"max_frame_age_s = {self.max_frame_age_s}: must be a finite number > 0")
        if self.max_instruction_chars < 1:
            raise ValueError(f"max_instruction_chars = {self.max_instruction_chars}: must be >= 1")
        if not isinstance(self.beam_width, int) or isinstance(self.beam_width, bool) or self.beam_width < 1:
            raise ValueError(f"beam_width = {self.beam_width!r}: must be an integer >= 1 (1 = greedy decoding)")
        if self.beam_margin is not None:
            check_beam_margin(self.beam_margin, "beam_margin")

    @property
    def period_ns(self) -> int:
        return int(round(NS / self.control_rate_hz))


def check_beam_margin(value: Any, where: str) -> float:
    """``value`` as a beam margin (a finite number; values lie in [0, 1], so -1 always takes the beam's
    action), else ValueError naming ``where``: the one check behind the loop's config, the node's
    parameter and the demo's config."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} = {value!r}: must be a finite number (values lie in [0, 1]; "
                         "-1 = always the beam's action)")
    return float(value)


def decoding_for(beam_width: int, beam_margin: float, beam_score: str) -> tuple[float | None, str]:
    """The loop's ``beam_margin`` for the node's parameters, and the decoding in words (logged at start).

    The margin compares values, so it applies to a beam ranked by Q (a Q-Transformer's); a cloning
    checkpoint's beam ranks by log-probability and always acts on its most likely action."""
    if beam_width == 1:
        return None, "greedy per action dim"
    if beam_score != "q":
        return None, f"beam search, width {beam_width}, the most likely whole action (cloning checkpoint: beam_margin does not apply)"
    return float(beam_margin), (f"beam search, width {beam_width}, acting on the beam's action only when its value "
                                f"beats the greedy action's by more than {beam_margin:g}")


@dataclass
class StepReport:
    """What one step did, for the node's Decision message and for tests."""

    time_ns: int
    """When the step started (the decision moment's step; a stop: when it was decided)."""
    frames: dict[str, Frame]
    instruction: str | None
    commanded: bool
    decision: Any | None = None
    """The policy's Decision when a command was published."""
    stop_reason: str | None = None
    states: dict[str, StateValue] = field(default_factory=dict)
    """State input name -> the value the step used (or found, when it stopped)."""


@dataclass
class _Instruction:
    requested: str | None = None
    """The instruction last received (None: none yet / empty)."""
    ready: str | None = None
    """The instruction whose embedding is ready (what the model conditions on)."""
    error: str | None = None
    """Why ``requested`` cannot be used (too long, embedding failed); None when fine."""
    pending: bool = False
    """``requested`` is being embedded in the background."""


@dataclass
class _Counters:
    decisions: int = 0
    """Decisions that produced a command."""
    stops: int = 0
    """Stop behaviours entered."""
    overruns: int = 0
    """Decision moments that found the previous step still running."""
    received: dict[str, int] = field(default_factory=dict)
    """Frames received per camera (stored or not)."""
    bad_frames: dict[str, int] = field(default_factory=dict)


class ControlLoop:
    """Inputs, decision moments and the safety state machine of closed-loop control (see module doc).

    ``clock_ns`` gives the current time (the node's ROS clock: sim time works); ``publish(values,
    time_ns, groups)`` sends one command on each output group listed (indices into ``output_groups``);
    ``report(StepReport)`` receives every step's outcome. Thread model: ``on_*`` and ``set_*`` are
    called from executor callbacks, ``step`` from one inference thread; one lock guards the inputs.
    """

    def __init__(self, policy: Any, config: LoopConfig, clock_ns: Callable[[], int],
                 publish: Callable[[np.ndarray, int, list[int]], None], report: Callable[[StepReport], None],
                 log: Log, output_groups: Sequence[Sequence[int]] | None = None,
                 fallback_instruction: str | None = None) -> None:
        self.policy = policy
        self.contract: RobotContract = policy.contract
        self.config = config
        self._clock_ns = clock_ns
        self._publish = publish
        self._report = report
        self.log = log
        c = self.contract
        self.output_groups = [tuple(g) for g in (output_groups or [tuple(range(c.num_action_dims))])]
        self.delta_dims = [i for i, d in enumerate(c.action_dims) if d.mode == "delta"]
        self.fallback_instruction = fallback_instruction if fallback_instruction is not None else c.instruction.fixed_text
        self.step_camera = c.cameras[0].name
        self.counters = _Counters(received={cam.name: 0 for cam in c.cameras},
                                  bad_frames={cam.name: 0 for cam in c.cameras})

        self._lock = threading.Lock()
        self._frames: dict[str, Frame] = {}
        self._states: dict[str, StateValue] = {}
        self._sources: dict[int, SourceValue] = {}
        self._decision_clock = DecisionClock(config.period_ns)
        self._decision_inputs: tuple[dict[str, Frame], dict[str, StateValue], dict[int, SourceValue]] | None = None
        self._decision_pending = False
        self._in_step = False
        self._instruction = _Instruction()
        self._enabled = True
        self._active = True
        self._moment_refused_ns: int | None = None
        """Arrival time of the last decision moment refused because commanding was not allowed (disabled or
        inactive), until a decision is made; ``set_enabled``/``set_active`` may then decide on it at once."""

        # state of the stepping thread only
        self._active_instruction: str | None = None
        self._stopped = True  # nothing commanded yet, so nothing to stop
        self._stop_reason = "not started"
        self._embedder = _Embedder(policy, self._on_embedded, log)
        self.policy.reset(self._usable(self.fallback_instruction))
        self._active_instruction = self._usable(self.fallback_instruction)

    # ------------------------------------------------------------------------------------------
    # inputs (executor side)
    # ------------------------------------------------------------------------------------------
    def on_frame(self, camera: str, image: np.ndarray, stamp_ns: int, received_ns: int) -> bool:
        """Store a camera's newest frame; True when it is a decision moment (step camera only): the
        caller then wakes the stepping thread (``request_step(decision=True)``)."""
        with self._lock:
            self.counters.received[camera] += 1
            current = self._frames.get(camera)
            if current is None or stamp_ns >= current.stamp_ns:  # never go back in time
                self._frames[camera] = Frame(image, int(stamp_ns), int(received_ns))
            if camera != self.step_camera or not self._decision_clock.offer(received_ns):
                return False
            # the observation of this moment: every input's newest value at or before it (sync.py, rule 2)
            self._decision_inputs = (dict(self._frames), dict(self._states), dict(self._sources))
            return True

    def on_bad_frame(self, camera: str) -> int:
        """Count a frame that could not be decoded; returns the count so far."""
        with self._lock:
            self.counters.received[camera] += 1
            self.counters.bad_frames[camera] += 1
            return self.counters.bad_frames[camera]

    def on_state(self, state: int | str, value: float, stamp_ns: int, received_ns: int) -> None:
        """A state input's newest value (by index in ``contract.state_inputs`` or by name). NaN and inf are
        stored and make the loop stop; a value stamped older than the one held is ignored (never go back
        in time, as for frames)."""
        name = self.state_name(state)
        with self._lock:
            current = self._states.get(name)
            if current is None or stamp_ns >= current.stamp_ns:
                self._states[name] = StateValue(float(value), int(stamp_ns), int(received_ns))

    def state_name(self, state: int | str) -> str:
        """The name of a state input given by index or name; KeyError names the contract's inputs."""
        names = [s.name for s in self.contract.state_inputs]
        if isinstance(state, str) and state in names:
            return state
        if isinstance(state, int) and not isinstance(state, bool) and 0 <= state < len(names):
            return names[state]
        raise KeyError(f"contract '{self.contract.name}' has no state input {state!r} (state inputs: {names})")

    def on_source(self, dim: int, value: float, received_ns: int) -> None:
        """A delta dim's measured source value (NaN and inf are stored and make the loop stop)."""
        with self._lock:
            self._sources[dim] = SourceValue(float(value), int(received_ns))

    def set_instruction(self, text: str | None) -> None:
        """A new instruction (None or empty: none). Long ones are rejected; unknown ones are embedded in
        the background while the loop stops."""
        text = text.strip() if text else None
        text = text or None
        with self._lock:
            if text == self._instruction.requested and self._instruction.error is None:
                return
            self._instruction = _Instruction(requested=text)
            if text is not None and len(text) > self.config.max_instruction_chars:
                self._instruction.error = (f"{len(text)} characters > max_instruction_chars "
                                           f"{self.config.max_instruction_chars}")
                self.log.warning(f"instruction rejected: {self._instruction.error} (starts {text[:60]!r})")
                return
            submit = text is not None and not self._embedder.is_ready(text)
            self._instruction.pending = submit
        if submit:
            self._embedder.submit(text)

    def embed_in_background(self, text: str) -> None:
        """Embed ``text`` off the control path (e.g. a scoring request's candidates)."""
        if not self._embedder.is_ready(text):
            self._embedder.submit(text)

    def _on_embedded(self, text: str, error: str | None) -> None:
        with self._lock:
            if self._instruction.requested != text:
                return  # superseded meanwhile
            self._instruction.pending = False
            self._instruction.error = error
        if error:
            self.log.error(f"instruction {text!r} cannot be used, not commanding: {error}")

    def set_enabled(self, enabled: bool) -> bool:
        """Allow or forbid commanding (``~/enable``). True: commanding has just become allowed and a frame
        that arrived while it was not is young enough to decide on now (``_decide_on_allow``)."""
        with self._lock:
            self._enabled = bool(enabled)
            return self._decide_on_allow()

    def set_active(self, active: bool) -> bool:
        """Lifecycle activation; returns as ``set_enabled`` does."""
        with self._lock:
            self._active = bool(active)
            return self._decide_on_allow()

    def _decide_on_allow(self) -> bool:
        """(Lock held.) Whether to decide now on the decision moment refused while commanding was not
        allowed. Why: otherwise the first command waits for the next frame, and a robot or a sim that
        waits for the answer to the frame it just sent (a sim on sim time after a reset) steps once without
        one. Only a frame younger than half a control period: an answer later than that would be paired
        with the next step (the pairing rule's tolerance); the staleness checks still apply to it."""
        refused = self._moment_refused_ns
        if not (self._enabled and self._active) or refused is None or self._decision_inputs is None:
            return False
        return self._clock_ns() - refused < self.config.period_ns // 2

    def request_step(self, decision: bool) -> bool:
        """Note that a step is wanted; True when a decision found the previous step still running (overrun)."""
        with self._lock:
            if not decision:
                return False
            overran = self._in_step or self._decision_pending
            self.counters.overruns += int(overran)
            self._decision_pending = True
            return overran

    def take_request(self) -> bool:
        """Stepping thread: start a step; returns whether it is a decision (else a watchdog check)."""
        with self._lock:
            self._in_step = True
            decision, self._decision_pending = self._decision_pending, False
            return decision

    def end_step(self) -> None:
        with self._lock:
            self._in_step = False

    # ------------------------------------------------------------------------------------------
    # state for the node and tests
    # ------------------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_reason(self) -> str | None:
        """Why the loop is not commanding now (None while it is)."""
        return self._stop_reason if self._stopped else None

    @property
    def active_instruction(self) -> str | None:
        return self._active_instruction

    def frames(self) -> dict[str, Frame]:
        with self._lock:
            return dict(self._frames)

    def states(self) -> dict[str, StateValue]:
        with self._lock:
            return dict(self._states)

    def instruction_state(self) -> tuple[str | None, str | None, bool]:
        """(requested instruction, error, embedding pending)."""
        with self._lock:
            i = self._instruction
            return i.requested, i.error, i.pending

    # ------------------------------------------------------------------------------------------
    # one step (stepping thread)
    # ------------------------------------------------------------------------------------------
    def _usable(self, instruction: str | None) -> str | None:
        return instruction if instruction is not None else self.fallback_instruction

    def _inputs(self, decision: bool) -> tuple[dict[str, Frame], dict[str, StateValue], dict[int, SourceValue],
                                               str | None, str | None, bool]:
        """(frames, states, sources, instruction, reason it cannot be used, commanding allowed)."""
        with self._lock:
            if decision and self._decision_inputs is not None:
                frames, states, sources = self._decision_inputs
            else:
                frames, states, sources = self._frames, self._states, self._sources
            ins = self._instruction
            instruction = self._usable(ins.requested)
            problem = None
            if ins.error is not None:
                problem = f"instruction {ins.requested[:60]!r} rejected ({ins.error})"
            elif ins.pending:
                problem = f"embedding instruction {ins.requested[:60]!r} (off the control path; the first unknown one builds the text model)"
            return dict(frames), dict(states), dict(sources), instruction, problem, self._enabled and self._active

    def input_problem(self, now_ns: int, frames: dict[str, Frame], sources: dict[int, SourceValue],
                      instruction: str | None, states: dict[str, StateValue] | None = None) -> str | None:
        """Why these inputs must not produce a command at ``now_ns`` (None: they may)."""
        limit = self.config.max_frame_age_s
        problem = self.camera_problem(now_ns, frames) or self.state_problem(now_ns, states or {})
        if problem is not None:
            return problem
        if instruction is None and not self.contract.instruction.allow_none:
            return "no instruction received"
        for i in self.delta_dims:
            s = sources.get(i)
            d = self.contract.action_dims[i]
            if s is None:
                return f"delta dim '{d.name}': no value yet on {d.source.topic} ({d.source.field})"
            if not math.isfinite(s.value):
                return f"delta dim '{d.name}': {d.source.topic} ({d.source.field}) is {s.value} (not finite)"
            age = (now_ns - s.received_ns) / NS
            if age > limit:
                return f"delta dim '{d.name}': {d.source.topic} is stale ({age:.3f} s > {limit} s)"
        return None

    def camera_problem(self, now_ns: int, frames: dict[str, Frame]) -> str | None:
        """A missing or stale camera frame at ``now_ns`` (None: every camera is fresh)."""
        limit = self.config.max_frame_age_s
        for cam in self.contract.cameras:
            f = frames.get(cam.name)
            if f is None:
                return f"no frame yet from camera '{cam.name}'"
            age = (now_ns - f.stamp_ns) / NS
            if age > limit:
                return f"camera '{cam.name}' is stale: frame {age:.3f} s old > {limit} s"
        return None

    def state_problem(self, now_ns: int, states: dict[str, StateValue]) -> str | None:
        """A missing, non-finite or stale state input at ``now_ns`` (None: every one is usable). Stale
        means older than ``max_frame_age_s``, the cameras' limit: the converter drops such steps too."""
        limit = self.config.max_frame_age_s
        for spec in self.contract.state_inputs:
            where = f"state input '{spec.name}' ({spec.source.topic} {spec.source.field}" + \
                    (f", joint {spec.source.joint!r})" if spec.source.joint else ")")
            v = states.get(spec.name)
            if v is None:
                return f"no value yet for {where}"
            if not math.isfinite(v.value):
                return f"{where} is {v.value} (not finite)"
            age = (now_ns - v.stamp_ns) / NS
            if age > limit:
                return f"{where} is stale: last value {age:.3f} s old > {limit} s"
        return None

    def step(self, decision: bool = True) -> StepReport:
        """One step. ``decision``: a decision moment (decide and command); otherwise a watchdog check
        (stop on bad inputs, never command). Never raises: a failing model stops the robot."""
        now = self._clock_ns()
        frames, states, sources, instruction, problem, allowed = self._inputs(decision)
        try:
            if instruction != self._active_instruction and problem is None:
                self._restart(instruction, "instruction changed")
            if not allowed:
                if decision:
                    step_frame = frames.get(self.step_camera)
                    with self._lock:
                        self._moment_refused_ns = None if step_frame is None else step_frame.received_ns
                return self._stop_report(now, frames, instruction, "disabled (~/enable false or lifecycle inactive)", states)
            if decision:
                with self._lock:
                    self._moment_refused_ns = None
            reason = problem or self.input_problem(now, frames, sources, instruction, states)
            if reason is not None:
                return self._stop_report(now, frames, instruction, reason, states)
            if not decision:
                return StepReport(now, frames, instruction, commanded=False, stop_reason=self.stop_reason, states=states)
            if self._stopped:
                self._restart(instruction, f"resuming after: {self._stop_reason}")
            result = self._decide(frames, states)
            action = np.asarray(result.action, dtype=np.float64)
            if action.shape != (self.contract.num_action_dims,) or not np.all(np.isfinite(action)) \
                    or not math.isfinite(float(result.value)):
                raise FloatingPointError(f"non-finite or mis-shaped decision: action {action}, value {result.value}")
            values = action.copy()
            for i in self.delta_dims:
                values[i] += sources[i].value
            if not np.all(np.isfinite(values)):
                raise FloatingPointError(f"non-finite command {values} (action {action} plus delta bases)")
            published = self._clock_ns()
            reason = self.input_problem(published, frames, sources, instruction, states)
            with self._lock:  # a change of enable, lifecycle or instruction while deciding
                allowed_now = self._enabled and self._active
                ins = self._instruction
                changed = self._usable(ins.requested) != instruction or ins.error is not None or ins.pending
            if reason is not None or not allowed_now or changed:
                why = reason or ("disabled while deciding" if not allowed_now else "instruction changed while deciding")
                return self._stop_report(published, frames, instruction,
                                         f"{why} (at publish time, after a {(published - now) / NS:.3f} s decision)", states)
            self._publish(values, published, list(range(len(self.output_groups))))
        except Exception as e:  # noqa: BLE001 - a failed step must stop the robot, not the loop
            self.log.error(f"control step failed, stopping: {type(e).__name__}: {e}")
            return self._stop_report(self._clock_ns(), frames, instruction, f"error: {type(e).__name__}: {e}", states)
        self._stopped = False
        self.counters.decisions += 1
        return self._emit(StepReport(now, frames, instruction, commanded=True, decision=result, states=states))

    def observation(self, frames: dict[str, Frame], states: dict[str, StateValue]) -> Observation:
        """The policy's input of one decision moment: the frames and the state inputs in contract order
        (float32, as the dataset stores them, so the model normalises live values exactly as in training)."""
        images = {name: f.image for name, f in frames.items()}
        stamps = {name: f.stamp_ns for name, f in frames.items()}
        if not self.contract.state_dim:
            return Observation(frames=images, stamps_ns=stamps)
        names = [s.name for s in self.contract.state_inputs]
        stamps.update({name: states[name].stamp_ns for name in names})
        state = np.array([states[name].value for name in names], dtype=np.float32)
        return Observation(frames=images, state=state, stamps_ns=stamps)

    def _decide(self, frames: dict[str, Frame], states: dict[str, StateValue]) -> Any:
        obs = self.observation(frames, states)
        if self.contract.state_dim:
            self.policy.push(obs)
        else:  # contracts without state: the frames-only shortcut every policy has
            self.policy.push_frames(dict(obs.frames))
        # beam width passed only when asked for: any object with the policy interface decides greedily
        beam: dict[str, Any] = {}
        if self.config.beam_width > 1:
            beam["beam_width"] = self.config.beam_width
            if self.config.beam_margin is not None:
                beam["beam_margin"] = self.config.beam_margin
        if self.config.use_streaming or not hasattr(self.policy, "decide_full"):
            return self.policy.decide(**beam)
        return self.policy.decide_full(**beam)

    def _restart(self, instruction: str | None, why: str) -> None:
        self.policy.reset(instruction)
        if instruction != self._active_instruction:
            self.log.info(f"history cleared ({why}); conditioning on {instruction!r}")
        self._active_instruction = instruction

    def _stop_report(self, now: int, frames: dict[str, Frame], instruction: str | None, reason: str,
                     states: dict[str, StateValue] | None = None) -> StepReport:
        self.stop(reason, now)
        return self._emit(StepReport(now, frames, instruction, commanded=False, stop_reason=reason, states=dict(states or {})))

    def _emit(self, report: StepReport) -> StepReport:
        try:
            self._report(report)
        except Exception as e:  # noqa: BLE001 - diagnostics must not break control
            self.log.error(f"could not report the step: {type(e).__name__}: {e}")
        return report

    def stop(self, reason: str, now_ns: int | None = None) -> None:
        """Enter the stop: the contract's stop behaviour once after the last command, never a stale or
        non-finite command; while stopped only the reason is updated."""
        if self._stopped:
            self._stop_reason = reason
            return
        self._stopped = True
        self._stop_reason = reason
        self.counters.stops += 1
        if self.contract.stop_behaviour != "zero":
            self.log.warning(f"stop (hold: no command sent): {reason}")
            return
        values = self.stop_values()
        groups = [g for g, dims in enumerate(self.output_groups) if all(math.isfinite(values[i]) for i in dims)]
        skipped = len(self.output_groups) - len(groups)
        if groups:
            try:
                self._publish(values, self._clock_ns() if now_ns is None else now_ns, groups)
            except Exception as e:  # noqa: BLE001
                self.log.error(f"could not publish the stop: {type(e).__name__}: {e}")
        extra = f"; {skipped} output(s) not sent: their delta base is not finite" if skipped else ""
        self.log.warning(f"stop (zero command sent{extra}): {reason}")

    def stop_values(self) -> np.ndarray:
        """The 'zero' stop: zero for absolute dims, the current measured value for delta dims (no motion;
        NaN where none is known, and such an output is not sent)."""
        values = np.zeros(self.contract.num_action_dims, dtype=np.float64)
        with self._lock:
            for i in self.delta_dims:
                values[i] = self._sources[i].value if i in self._sources else math.nan
        return values

    def close(self) -> None:
        self._embedder.close()


class _Embedder:
    """Embeds instructions on its own thread, in order, so the control path never builds the text
    model or tokenises; ``is_ready`` says whether an instruction needs no work."""

    def __init__(self, policy: Any, done: Callable[[str, str | None], None], log: Log) -> None:
        self.policy = policy
        self.done = done
        self.log = log
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def is_ready(self, text: str) -> bool:
        check = getattr(self.policy, "is_embedded", None)
        return True if check is None else bool(check(text))

    def submit(self, text: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="instruction_embedder", daemon=True)
            self._thread.start()
        self._queue.put(text)

    def _run(self) -> None:
        while True:
            text = self._queue.get()  # every request (scoring candidates too); a superseded one is ignored on arrival
            if text is None:
                return
            if self.is_ready(text):
                self.done(text, None)
                continue
            try:
                self.policy.embed_instruction(text)
                error = None
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
            self.done(text, error)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30.0)
            self._thread = None
