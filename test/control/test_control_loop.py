"""ControlLoop with a fake clock and a fake policy: every stop cause, recovery, non-finite inputs, slow
decisions, instructions off the control path, decision moments. No ROS, no torch."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from q_transformer_ros.control.loop import ControlLoop, LoopConfig, StepReport, decoding_for
from q_transformer_ros.contract import parse_contract

MS = 1_000_000
S = 1_000_000_000


STATE_INPUTS = [
    {"name": "ee_z", "low": 0.0, "high": 1.0,
     "source": {"topic": "/ee_pose", "msg_type": "geometry_msgs/msg/PoseStamped", "field": "pose.position.z"}},
    {"name": "gripper", "low": 0.0, "high": 1.0,
     "source": {"topic": "/gripper_state", "msg_type": "sensor_msgs/msg/JointState", "field": "position",
                "joint": "gripper"}},
]


def contract(stop: str = "zero", state: bool = False):
    ref = lambda topic, mt, f, **k: {"topic": topic, "msg_type": mt, "field": f, **k}  # noqa: E731
    return parse_contract({
        **({"state_inputs": STATE_INPUTS} if state else {}),
        "name": "loop_test", "control_rate_hz": 10.0, "frame_history": 2, "max_frame_age_s": 0.3,
        "stop_behaviour": stop,
        "cameras": [{"name": "front", "topic": "/front", "height": 8, "width": 8},
                    {"name": "wrist", "topic": "/wrist", "height": 8, "width": 8}],
        "instruction": {"topic": "/instruction"},
        "action_dims": [
            {"name": "vx", "low": -1.0, "high": 1.0, "bins": 4,
             "source": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.x"),
             "target": ref("/cmd", "geometry_msgs/msg/TwistStamped", "twist.linear.x")},
            {"name": "elbow", "low": -0.2, "high": 0.2, "bins": 4, "mode": "delta",
             "source": ref("/joint_states", "sensor_msgs/msg/JointState", "position[0]", joint="elbow"),
             "target": ref("/joint_cmd", "sensor_msgs/msg/JointState", "position[0]", joint="elbow")},
        ],
    })


class Clock:
    def __init__(self) -> None:
        self.t = 10 * S

    def __call__(self) -> int:
        return self.t

    def advance(self, ns: int) -> None:
        self.t += int(ns)


@dataclass
class FakeDecision:
    action: np.ndarray
    bins: np.ndarray
    q_values: np.ndarray
    value: float
    inference_time_s: float = 0.0


class FakePolicy:
    """Decides a fixed action; ``delay_ns`` advances the fake clock during a decision; ``known`` are the
    instructions with cached embeddings (others need ``embed_instruction``, which can be made slow)."""

    def __init__(self, clock: Clock, c) -> None:
        self.clock, self.contract = clock, c
        self.delay_ns = 0
        self.action = np.array([0.5, 0.05])
        self.known = {"pick", "place"}
        self.embed_gate = threading.Event()
        self.embed_gate.set()
        self.resets: list = []
        self.pushes = 0
        self.observations: list = []
        """Observations given through ``push`` (contracts with state inputs)."""
        self.decide_kwargs: list[dict] = []

    def reset(self, instruction=None) -> None:
        assert instruction is None or instruction in self.known, f"reset with unembedded {instruction!r}"
        self.resets.append(instruction)

    def push_frames(self, frames) -> None:
        assert not self.contract.state_dim, "a contract with state inputs must push observations"
        self.pushes += 1

    def push(self, obs) -> None:
        obs.check(self.contract)  # the policy's own check: shapes, cameras, finite state
        self.observations.append(obs)
        self.pushes += 1

    def decide(self, **kwargs):
        self.decide_kwargs.append(kwargs)
        self.clock.advance(self.delay_ns)
        return FakeDecision(self.action.copy(), np.zeros(2, int), np.zeros(2), 0.5)

    def is_embedded(self, text: str) -> bool:
        return text in self.known

    def embed_instruction(self, text: str) -> None:
        self.embed_gate.wait(5.0)
        self.known.add(text)


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, m: str) -> None:
        self.lines.append(("info", m))

    def warning(self, m: str) -> None:
        self.lines.append(("warning", m))

    def error(self, m: str) -> None:
        self.lines.append(("error", m))


@dataclass
class Rig:
    clock: Clock
    policy: FakePolicy
    loop: ControlLoop
    published: list = field(default_factory=list)
    """(time_ns, values copy, groups)"""
    reports: list = field(default_factory=list)
    log: Log = field(default_factory=Log)

    def frames(self, age_ns: int = 0, cameras=("wrist", "front")) -> bool:
        """New frames, the step camera ('front') last: its arrival is the decision moment."""
        decision = False
        for cam in cameras:
            decision |= self.loop.on_frame(cam, np.zeros((3, 8, 8), np.uint8), self.clock.t - age_ns, self.clock.t)
        return decision

    def joint(self, value: float) -> None:
        self.loop.on_source(1, value, self.clock.t)

    def tick(self, decision: bool = True) -> StepReport:
        return self.loop.step(decision)

    def moving(self) -> list:
        """Published commands that are not the stop (vx != 0)."""
        return [p for p in self.published if p[1][0] != 0.0]


def make_rig(stop: str = "zero", state: bool = False, **cfg) -> Rig:
    clock = Clock()
    c = contract(stop, state)
    policy = FakePolicy(clock, c)
    rig = Rig(clock, policy, None)  # type: ignore[arg-type]
    rig.loop = ControlLoop(
        policy, LoopConfig(10.0, 0.3, **cfg), clock_ns=clock,
        publish=lambda v, t, g: rig.published.append((t, np.array(v), list(g))),
        report=rig.reports.append, log=rig.log, output_groups=[(0,), (1,)])
    rig.loop.set_instruction("pick")
    return rig


def run_ok(rig: Rig, steps: int = 3, joint: float = 1.0) -> None:
    for _ in range(steps):
        rig.clock.advance(100 * MS)
        rig.joint(joint)
        rig.frames()
        rig.tick()


def test_fresh_inputs_command_action_plus_delta_base() -> None:
    rig = make_rig()
    run_ok(rig, 3, joint=1.0)
    assert len(rig.published) == 3 and rig.loop.stop_reason is None
    np.testing.assert_allclose(rig.published[-1][1], [0.5, 1.05])
    assert rig.reports[-1].commanded and rig.reports[-1].decision is not None


def test_beam_width_reaches_the_policy_and_greedy_asks_nothing_extra() -> None:
    """A beam width > 1 is passed to ``decide``; greedy (1) calls ``decide()`` exactly as before, so any
    object with the policy interface keeps working."""
    greedy = make_rig()
    run_ok(greedy, 2)
    assert greedy.policy.decide_kwargs == [{}, {}]
    beam = make_rig(beam_width=4)
    run_ok(beam, 2)
    assert beam.policy.decide_kwargs == [{"beam_width": 4}, {"beam_width": 4}] and len(beam.published) == 2
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="beam_width"):
            LoopConfig(10.0, 0.3, beam_width=bad)
    guarded = make_rig(beam_width=4, beam_margin=0.05)
    run_ok(guarded, 1)
    assert guarded.policy.decide_kwargs == [{"beam_width": 4, "beam_margin": 0.05}]
    margin_alone = make_rig(beam_margin=0.05)  # greedy: nothing to guard, nothing extra asked
    run_ok(margin_alone, 1)
    assert margin_alone.policy.decide_kwargs == [{}]
    for bad in (float("nan"), float("inf"), "0.05", True):
        with pytest.raises(ValueError, match="beam_margin"):
            LoopConfig(10.0, 0.3, beam_width=4, beam_margin=bad)


def test_decoding_for_guards_a_q_beam_and_leaves_greedy_and_cloning_beams_alone() -> None:
    """The node's parameters -> the loop's margin: a margin only where it means something (a beam ranked
    by Q), and the decoding in words for the start-up log."""
    assert decoding_for(1, 0.05, "q") == (None, "greedy per action dim")
    margin, words = decoding_for(8, 0.05, "q")
    assert margin == 0.05 and "width 8" in words and "more than 0.05" in words
    margin, words = decoding_for(8, 0.05, "log_prob")
    assert margin is None and "cloning checkpoint: beam_margin does not apply" in words


def test_stale_camera_stops_once_with_reason_then_recovers_with_a_fresh_history() -> None:
    rig = make_rig()
    run_ok(rig)
    n, resets = len(rig.published), len(rig.policy.resets)
    rig.clock.advance(100 * MS)
    rig.joint(1.0)
    rig.frames(cameras=("front",))  # the wrist camera went silent
    for _ in range(5):
        rig.clock.advance(100 * MS)
        rig.joint(1.0)
        rig.frames(cameras=("front",))
        rig.tick()
    after = rig.published[n:]
    stops = [p for p in after if p[1][0] == 0.0]
    assert len(stops) == 1 and after[-1] is stops[0] and stops[0][1][1] == 1.0  # one zero stop, elbow holds, then nothing
    assert "camera 'wrist' is stale" in rig.loop.stop_reason
    assert rig.reports[-1].stop_reason == rig.loop.stop_reason and not rig.reports[-1].commanded
    assert rig.loop.counters.stops == 1
    moving = len(rig.moving())
    run_ok(rig, 2)
    assert rig.loop.stop_reason is None and len(rig.moving()) == moving + 2
    assert len(rig.policy.resets) == resets + 1  # the history restarts after the gap


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_delta_base_never_reaches_the_robot(bad) -> None:
    rig = make_rig()
    run_ok(rig)
    n = len(rig.published)
    rig.clock.advance(100 * MS)
    rig.joint(bad)
    rig.frames()
    rig.tick()
    assert "not finite" in rig.loop.stop_reason
    new = rig.published[n:]
    assert all(np.all(np.isfinite(v[1][g])) for v in new for g in v[2])
    # the zero stop goes out on the twist only: the elbow's base is not finite, so its output is not sent
    assert [v[2] for v in new] == [[0]]


def test_non_finite_decision_stops_with_the_error() -> None:
    rig = make_rig()
    run_ok(rig)
    rig.policy.action = np.array([math.nan, 0.0])
    run_ok(rig, 2)
    assert rig.loop.stop_reason.startswith("error: FloatingPointError")
    assert all(np.all(np.isfinite(v[1])) for v in rig.published)
    rig.policy.action = np.array([0.5, 0.0])
    run_ok(rig, 1)
    assert rig.loop.stop_reason is None


def test_slow_decision_never_publishes_from_inputs_that_went_stale() -> None:
    rig = make_rig()
    run_ok(rig)
    n = len(rig.published)
    rig.policy.delay_ns = 350 * MS  # longer than the 0.3 s limit
    for _ in range(4):
        run_ok(rig, 1)
    assert len(rig.moving()) == n
    assert "stale" in rig.loop.stop_reason
    assert any(r.stop_reason and "at publish time" in r.stop_reason for r in rig.reports)
    rig.policy.delay_ns = 150 * MS  # slow, but fresh when published
    run_ok(rig, 2)
    assert rig.loop.stop_reason is None and len(rig.moving()) == n + 2


def test_watchdog_steps_never_command_and_stop_a_silent_camera() -> None:
    rig = make_rig()
    run_ok(rig)
    n = len(rig.published)
    rig.clock.advance(100 * MS)
    rig.tick(decision=False)
    assert len(rig.published) == n  # inputs fine: nothing to do
    rig.clock.advance(400 * MS)  # no frames at all now
    rig.tick(decision=False)
    assert len(rig.published) == n + 1 and rig.published[-1][1][0] == 0.0
    assert "stale" in rig.loop.stop_reason


def test_disable_stops_and_enable_resumes() -> None:
    rig = make_rig("hold")
    run_ok(rig)
    n = len(rig.published)
    rig.loop.set_enabled(False)
    run_ok(rig, 3)
    assert len(rig.published) == n and rig.loop.stop_reason.startswith("disabled")  # hold: nothing sent
    rig.loop.set_enabled(True)
    run_ok(rig, 1)
    assert len(rig.published) == n + 1


def test_enabling_answers_a_frame_that_came_while_disabled_if_it_is_young() -> None:
    """A sim on sim time (or a robot) that sends its first frame just before ``~/enable true`` waits for
    the answer to it: enabling decides on that frame at once, with a fresh history. A frame older than
    half a period is left alone (its answer would be paired with the next step); so is one that was
    already answered, and a disable never asks for a decision."""
    rig = make_rig()
    run_ok(rig, 2)
    assert rig.loop.set_enabled(False) is False
    rig.tick(decision=False)  # the stop goes out at once
    resets, decisions = len(rig.policy.resets), len(rig.policy.decide_kwargs)
    rig.clock.advance(100 * MS)
    rig.joint(1.0)
    assert rig.frames()  # the first frame of an episode, while disabled
    report = rig.tick()
    assert not report.commanded and len(rig.policy.decide_kwargs) == decisions
    rig.clock.advance(20 * MS)  # the enable comes 20 ms later
    assert rig.loop.set_enabled(True) is True
    report = rig.tick(decision=True)
    assert report.commanded and len(rig.policy.decide_kwargs) == decisions + 1
    assert report.frames["front"].received_ns == rig.clock.t - 20 * MS  # the frame that came while disabled
    assert len(rig.policy.resets) == resets + 1  # resumed after a stop: the history starts fresh
    assert rig.loop.set_enabled(True) is False  # answered: nothing more to decide on

    rig.loop.set_enabled(False)
    rig.clock.advance(100 * MS)
    rig.joint(1.0)
    rig.frames()
    rig.tick()
    rig.clock.advance(60 * MS)  # more than half a period (50 ms): wait for the next frame
    assert rig.loop.set_enabled(True) is False
    rig.loop.set_active(False)
    assert rig.loop.set_active(True) is False


def test_too_long_instruction_is_rejected() -> None:
    rig = make_rig(max_instruction_chars=50)
    run_ok(rig)
    n = len(rig.published)
    rig.loop.set_instruction("x" * 1_000_000)
    run_ok(rig, 2)
    assert len(rig.moving()) == n and "max_instruction_chars 50" in rig.loop.stop_reason
    assert any(level == "warning" and "instruction rejected" in m for level, m in rig.log.lines)
    rig.loop.set_instruction("place")
    run_ok(rig, 1)
    assert rig.loop.stop_reason is None and rig.policy.resets[-1] == "place"


def test_new_instruction_is_embedded_off_the_control_path() -> None:
    rig = make_rig()
    run_ok(rig)
    n = len(rig.published)
    rig.policy.embed_gate.clear()  # the text model takes its time
    t0 = time.perf_counter()
    rig.loop.set_instruction("open the drawer")
    run_ok(rig, 3)
    assert time.perf_counter() - t0 < 1.0  # neither set_instruction nor the steps waited for it
    assert len(rig.moving()) == n and rig.loop.stop_reason.startswith("embedding instruction")
    rig.policy.embed_gate.set()
    deadline = time.monotonic() + 5
    while rig.loop.instruction_state()[2] and time.monotonic() < deadline:
        time.sleep(0.01)
    run_ok(rig, 1)
    assert rig.loop.stop_reason is None and rig.policy.resets[-1] == "open the drawer"
    rig.loop.close()


def test_decision_moments_follow_the_step_camera() -> None:
    rig = make_rig()
    decisions = []
    for k in range(30):  # 30 Hz step camera, 10 Hz control: every third frame
        rig.clock.advance(S // 30)
        decisions.append(rig.loop.on_frame("front", np.zeros((3, 8, 8), np.uint8), rig.clock.t, rig.clock.t))
        assert not rig.loop.on_frame("wrist", np.zeros((3, 8, 8), np.uint8), rig.clock.t, rig.clock.t)
    assert sum(decisions) == 10 and decisions[0]
    assert not rig.loop.request_step(True) and rig.loop.request_step(True)  # a second request is an overrun
    assert rig.loop.counters.overruns == 1


def test_random_inputs_never_give_a_command_from_stale_or_non_finite_inputs() -> None:
    """Fuzz: random frame ages, camera dropouts, joint values, decision delays; every published non-stop
    command must come from inputs within 0.3 s at its publish time and be finite."""
    rng = np.random.default_rng(0)
    rig = make_rig()
    seen: dict[str, int] = {}
    joint_t = -1
    bad = 0
    for _ in range(2000):
        rig.clock.advance(int(rng.uniform(20, 150) * MS))
        if rng.random() < 0.8:
            rig.joint(float(rng.choice([0.1, 0.2, math.nan])) if rng.random() < 0.05 else 0.1)
            joint_t = rig.clock.t
        for cam in ("wrist", "front"):
            if rng.random() < 0.85:
                age = int(rng.uniform(0, 0.4) * S)
                rig.loop.on_frame(cam, np.zeros((3, 8, 8), np.uint8), rig.clock.t - age, rig.clock.t)
                seen[cam] = max(seen.get(cam, 0), rig.clock.t - age)
        rig.policy.delay_ns = int(rng.uniform(0, 0.35) * S)
        before = len(rig.published)
        rig.tick(decision=bool(rng.random() < 0.8))
        for t, values, groups in rig.published[before:]:
            assert all(np.all(np.isfinite(values[list(rig.loop.output_groups[g])])) for g in groups)
            if values[0] != 0.0:  # a real command: its inputs were fresh when it was published
                frames = rig.reports[-1].frames
                assert all(t - f.stamp_ns <= 0.3 * S for f in frames.values())
                assert t - joint_t <= 0.3 * S or bad
    assert rig.loop.counters.decisions > 100 and rig.loop.counters.stops > 10


def test_every_background_embedding_request_is_served() -> None:
    """Scoring hands several unknown candidates at once: each is embedded (none is dropped as superseded)."""
    rig = make_rig()
    for text in ("stack the cups", "wipe the table", "open the lid"):
        rig.loop.embed_in_background(text)
    deadline = time.monotonic() + 5
    while not {"stack the cups", "wipe the table", "open the lid"} <= rig.policy.known and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {"stack the cups", "wipe the table", "open the lid"} <= rig.policy.known
    rig.loop.close()


# ----------------------------------------------------------------------------------------------
# state inputs: the same checks as cameras (missing, stale, non-finite -> stop, never a command)
# ----------------------------------------------------------------------------------------------

def feed_state(rig: Rig, z: float = 0.4, grip: float = 0.9, age_ns: int = 0, names=("ee_z", "gripper")) -> None:
    values = {"ee_z": z, "gripper": grip}
    for name in names:
        rig.loop.on_state(name, values[name], rig.clock.t - age_ns, rig.clock.t)


def run_state_ok(rig: Rig, steps: int = 3, z: float = 0.4) -> None:
    for _ in range(steps):
        rig.clock.advance(100 * MS)
        rig.joint(1.0)
        feed_state(rig, z=z)
        rig.frames()
        rig.tick()


def test_state_goes_to_the_policy_in_contract_order_with_the_frames() -> None:
    rig = make_rig(state=True)
    run_state_ok(rig, 2, z=0.25)
    assert rig.loop.stop_reason is None and len(rig.moving()) == 2
    obs = rig.policy.observations[-1]
    assert obs.state.dtype == np.float32 and obs.state.tolist() == [np.float32(0.25), np.float32(0.9)]
    assert set(obs.frames) == {"front", "wrist"}
    assert obs.stamps_ns["ee_z"] == rig.clock.t and obs.stamps_ns["front"] == rig.clock.t
    report = rig.reports[-1]
    assert report.commanded and report.states["ee_z"].value == 0.25


def test_state_by_index_or_name_and_unknown_names_are_refused() -> None:
    rig = make_rig(state=True)
    rig.loop.on_state(1, 0.3, rig.clock.t, rig.clock.t)
    assert rig.loop.states()["gripper"].value == 0.3
    with pytest.raises(KeyError, match="no state input 'elbow'.*'ee_z', 'gripper'"):
        rig.loop.on_state("elbow", 0.1, rig.clock.t, rig.clock.t)
    with pytest.raises(KeyError):
        rig.loop.on_state(2, 0.1, rig.clock.t, rig.clock.t)


def test_missing_state_input_means_no_command() -> None:
    rig = make_rig(state=True)
    for _ in range(3):
        rig.clock.advance(100 * MS)
        rig.joint(1.0)
        feed_state(rig, names=("ee_z",))  # the gripper never reported
        rig.frames()
        rig.tick()
    assert rig.moving() == [] and rig.policy.pushes == 0
    assert rig.loop.stop_reason == ("no value yet for state input 'gripper' (/gripper_state position, "
                                    "joint 'gripper')")


def test_stale_state_stops_once_naming_the_input_then_recovers() -> None:
    rig = make_rig(state=True)
    run_state_ok(rig)
    n, resets = len(rig.published), len(rig.policy.resets)
    for _ in range(5):  # the pose driver hangs: ee_z keeps its old value, everything else is fresh
        rig.clock.advance(100 * MS)
        rig.joint(1.0)
        feed_state(rig, names=("gripper",))
        rig.frames()
        rig.tick()
    after = rig.published[n:]
    # commands while ee_z is at most 0.3 s old (3 steps), then one zero stop, then nothing
    assert [p[1][0] for p in after] == [0.5, 0.5, 0.5, 0.0]
    assert rig.loop.stop_reason == "state input 'ee_z' (/ee_pose pose.position.z) is stale: last value 0.500 s old > 0.3 s"
    assert rig.reports[-1].stop_reason == rig.loop.stop_reason and not rig.reports[-1].commanded
    moving = len(rig.moving())
    run_state_ok(rig, 2)
    assert rig.loop.stop_reason is None and len(rig.moving()) == moving + 2
    assert len(rig.policy.resets) == resets + 1  # the history restarts after the gap


def test_state_stamped_too_old_is_stale_even_when_it_just_arrived() -> None:
    rig = make_rig(state=True)
    run_state_ok(rig)
    rig.clock.advance(100 * MS)
    feed_state(rig, age_ns=350 * MS)  # arrives now, measured 0.35 s ago: ignored (older than held) ...
    rig.clock.advance(300 * MS)  # ... so the held one ages out
    rig.joint(1.0)
    rig.frames()
    rig.tick()
    assert "state input 'ee_z'" in rig.loop.stop_reason and "stale" in rig.loop.stop_reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_state_never_reaches_the_model_or_the_robot(bad) -> None:
    rig = make_rig(state=True)
    run_state_ok(rig)
    n, pushes = len(rig.published), rig.policy.pushes
    rig.clock.advance(100 * MS)
    rig.joint(1.0)
    feed_state(rig, z=bad)
    rig.frames()
    rig.tick()
    assert rig.loop.stop_reason == f"state input 'ee_z' (/ee_pose pose.position.z) is {bad} (not finite)"
    assert rig.policy.pushes == pushes
    assert [p[1][0] for p in rig.published[n:]] == [0.0]


def test_the_observation_is_the_state_at_the_decision_moment() -> None:
    """A value that arrives after the step camera's decision frame belongs to the next step (rule 2)."""
    rig = make_rig(state=True)
    rig.clock.advance(100 * MS)
    rig.joint(1.0)
    feed_state(rig, z=0.1)
    assert rig.frames()  # the decision moment
    feed_state(rig, z=0.7)  # before the stepping thread ran
    rig.tick()
    assert rig.policy.observations[-1].state[0] == np.float32(0.1)


def test_state_going_stale_during_a_slow_decision_is_not_commanded() -> None:
    rig = make_rig(state=True)
    run_state_ok(rig)
    n = len(rig.moving())
    rig.clock.advance(250 * MS)  # the gripper's last value is 0.25 s old: fresh now, stale 0.05 s later
    rig.joint(1.0)
    feed_state(rig, names=("ee_z",))
    rig.frames()
    rig.policy.delay_ns = 100 * MS
    rig.joint(1.0)
    rig.tick()
    assert len(rig.moving()) == n
    assert "state input 'gripper'" in rig.loop.stop_reason and "at publish time" in rig.loop.stop_reason


def test_random_state_never_gives_a_command_from_stale_or_non_finite_state() -> None:
    """Fuzz: random state ages, dropouts and NaNs; every published command's state was finite and within
    0.3 s at its publish time, and the model never saw a non-finite value (its check would raise)."""
    rng = np.random.default_rng(1)
    rig = make_rig(state=True)
    for _ in range(1500):
        rig.clock.advance(int(rng.uniform(20, 150) * MS))
        rig.joint(0.1)
        for name in ("ee_z", "gripper"):
            if rng.random() < 0.85:
                value = math.nan if rng.random() < 0.03 else float(rng.uniform(0, 1))
                rig.loop.on_state(name, value, rig.clock.t - int(rng.uniform(0, 0.4) * S), rig.clock.t)
        rig.frames()
        rig.policy.delay_ns = int(rng.uniform(0, 0.2) * S)
        before = len(rig.published)
        rig.tick(decision=bool(rng.random() < 0.8))
        for t, values, groups in rig.published[before:]:
            if values[0] != 0.0:
                states = rig.reports[-1].states
                assert set(states) == {"ee_z", "gripper"}
                assert all(math.isfinite(v.value) and t - v.stamp_ns <= 0.3 * S for v in states.values())
    assert rig.loop.counters.decisions > 50 and rig.loop.counters.stops > 10
