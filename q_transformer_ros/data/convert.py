"""Recorded bags -> replay dataset (``convert_bag``), per the robot contract.

Per bag, in a worker process:
1. open it (any rosbag2 / ROS 1 form) and check every contract topic is there with the right type;
2. pass 1 (``_read_small_topics``) reads the small topics (action sources, state inputs, instruction,
   success, episode markers) and the step camera's frame times, and ``build_spans`` cuts the bag into episode
   spans (whole bag, episode topic or time gaps; an instruction change or a success message also ends
   a span);
3. ``plan_span`` applies THE pairing rule (``sync.plan_steps``, written down in ``sync.py``): decision
   moments from the step camera, each step's command from its response window;
4. pass 2 (``_select_frames``) streams the camera topics and decodes only frames that some step
   selects, with the same ``frame_from_msg`` the policy node uses;
5. ``build_episodes`` samples each state input at the decision moments (``sync.values_at``: the newest
   value at or before, the rule of the non-step cameras), drops stale steps (a frame or a state value
   too old, a state value missing or not finite; every drop counted with its reason), splits a span where a
   gap was dropped, labels success and makes a labelled outcome terminal; ``summarize`` fills the report.
The parent writes each bag's episodes in one dataset transaction (a bag is all or nothing; finished
bags survive a failure or a kill). Episode ids are ``<bag identity>:<span>:<run>``, so a re-run skips
bags already converted.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from q_transformer_ros.data.bag_reader import BagError, BagInfo, BagReader, bag_name, find_bags
from q_transformer_ros.contract import (
    INSTRUCTION_MSG_TYPES, SUCCESS_MSG_TYPES, ContractError, RobotContract, StateInputSpec, load_contract,
)
from q_transformer_ros.data.image import ImageError, frame_from_msg
from q_transformer_ros.data.labels import Labels, LabelsError, load_labels
from q_transformer_ros.data.messages import FieldError, JointNotInMessage, group_dims_by_topic, read_field
from q_transformer_ros.data.sync import (
    NS, AgeStats, DimStream, LatestFrameSelector, StepPlan, actions_for_steps, plan_steps, valid_runs, values_at,
)
from q_transformer_ros.replay.still_steps import dropped_reason, keep_option_problem, keep_still_steps, still_steps

UNLABELED_CHOICES = ("refuse", "failure", "skip")
ON_ERROR_CHOICES = ("abort", "skip")


class ConvertError(ValueError):
    """A conversion that cannot go on; names the bag / topic / field / option."""


# ---------------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpisodeSplit:
    """How a bag is cut into episodes (before instruction changes and success messages cut further)."""

    mode: str = "bag"
    """``bag``: one episode per bag; ``topic``: messages on ``topic`` mark episodes; ``gap``: a pause
    longer than ``gap_s`` in the action topics ends an episode."""
    topic: str | None = None
    """Episode marker topic (mode ``topic``): std_msgs/Bool True starts and False ends an episode;
    any other message type starts a new episode at each message."""
    gap_s: float = 0.0
    """Pause length that separates episodes (mode ``gap``)."""

    def __post_init__(self) -> None:
        if self.mode not in ("bag", "topic", "gap"):
            raise ConvertError(f"--episode-split: mode {self.mode!r} unknown; use bag, topic:<topic> or gap:<seconds>")
        if self.mode == "topic" and not self.topic:
            raise ConvertError("--episode-split topic:<topic> needs a topic name")
        if self.mode == "gap" and not (self.gap_s > 0 and math.isfinite(self.gap_s)):
            raise ConvertError(f"--episode-split gap:<seconds> needs seconds > 0, got {self.gap_s!r}")

    @classmethod
    def parse(cls, text: str) -> "EpisodeSplit":
        if text == "bag":
            return cls("bag")
        kind, sep, arg = text.partition(":")
        if kind == "topic" and sep:
            return cls("topic", topic=arg)
        if kind == "gap" and sep:
            try:
                return cls("gap", gap_s=float(arg))
            except ValueError:
                raise ConvertError(f"--episode-split {text!r}: {arg!r} is not a number of seconds") from None
        raise ConvertError(f"--episode-split {text!r}: use bag, topic:<topic> or gap:<seconds>")


@dataclass(frozen=True)
class ConvertConfig:
    """Everything a worker needs to convert one bag (picklable)."""

    contract: RobotContract
    """The robot contract: topics, fields, camera sizes, control rate."""
    instruction: str | None = None
    """Instruction for every episode; overrides the instruction topic and bag metadata."""
    success: bool | None = None
    """--success / --failure: label every episode the labels file does not label."""
    labels: Labels | None = None
    """Per-bag labels (highest priority)."""
    unlabeled: str = "refuse"
    """Episodes with no label at all: ``refuse`` (error), ``failure`` (label False) or ``skip``."""
    split: EpisodeSplit = field(default_factory=EpisodeSplit)
    """How bags are cut into episodes."""
    max_frame_age_s: float | None = None
    """Frames older than this at a step make it stale (default: the contract's ``max_frame_age_s``)."""
    max_action_age_s: float | None = None
    """If set, a command older than this at a step end makes the step stale (default: commands hold)."""
    min_steps: int = 1
    """Episodes (runs of valid steps) shorter than this are dropped."""
    keep_still_steps: int | None = None
    """If set, keep only the first this many steps of every stretch in which the state inputs stand still
    and the command repeats (``replay.still_steps``: an operator waiting after a stop, a pause); None keeps
    every step. Needs state inputs in the contract."""
    known_bags: frozenset[str] = frozenset()
    """Bag identities already in the output dataset: such bags are skipped without decoding."""

    def __post_init__(self) -> None:
        if self.unlabeled not in UNLABELED_CHOICES:
            raise ConvertError(f"--unlabeled {self.unlabeled!r}: use one of {UNLABELED_CHOICES}")
        if self.max_frame_age_s is not None and not self.max_frame_age_s > 0:
            raise ConvertError(f"--max-frame-age {self.max_frame_age_s!r}: must be > 0 seconds")
        if self.max_action_age_s is not None and not self.max_action_age_s > 0:
            raise ConvertError(f"--max-action-age {self.max_action_age_s!r}: must be > 0 seconds")
        if not (isinstance(self.min_steps, int) and self.min_steps >= 1):
            raise ConvertError(f"--min-steps {self.min_steps!r}: must be an integer >= 1")
        if self.instruction is not None and not self.instruction.strip():
            raise ConvertError("--instruction: empty text")
        if self.keep_still_steps is not None and (problem := keep_option_problem(self.keep_still_steps, self.contract)):
            raise ConvertError(problem)

    @property
    def frame_age_limit_s(self) -> float:
        return self.max_frame_age_s if self.max_frame_age_s is not None else self.contract.max_frame_age_s


@dataclass
class ConvertedEpisode:
    """One episode as a worker hands it to the parent (kept free of the dataset module so workers stay light)."""

    frames: dict[str, np.ndarray]
    actions: np.ndarray
    success: bool
    terminal: bool | None
    instruction: str | None
    source_id: str
    metadata: dict[str, Any]
    decision_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """int64 (k,) each step's decision moment (bag receive time); for the report, not stored."""
    frame_times_ns: dict[str, np.ndarray] = field(default_factory=dict)
    """camera -> int64 (k,) receive time of the frame each step uses; for the report, not stored."""
    state: np.ndarray | None = None
    """float32 (k, S) each state input's newest value at the decision moment (None: the contract has none)."""
    state_times_ns: np.ndarray | None = None
    """int64 (k, S) receive time of each state value used; for the report, not stored."""


@dataclass
class BagReport:
    """What happened to one bag, for the final table (and ``--report-json``)."""

    bag: str
    status: str = "converted"
    """converted | already in dataset | error | no episodes"""
    identity: str = ""
    episodes: int = 0
    successes: int = 0
    steps: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of steps dropped (every step left out of the dataset is counted under a reason)."""
    notes: dict[str, int] = field(default_factory=dict)
    """What was kept but is worth knowing (held commands, truncated episodes), with counts."""
    frame_age_p50_s: dict[str, float | None] = field(default_factory=dict)
    """Camera -> median age of its frame at the decision moment (None: no step written)."""
    frame_age_p99_s: dict[str, float | None] = field(default_factory=dict)
    action_min: list[float] = field(default_factory=list)
    action_max: list[float] = field(default_factory=list)
    clipped: dict[str, int] = field(default_factory=dict)
    """Action dim -> steps whose action lies outside the contract range (clipped into the edge bins)."""
    state_min: list[float] = field(default_factory=list)
    """Per state input (contract order), the smallest value stored."""
    state_max: list[float] = field(default_factory=list)
    state_outside: dict[str, int] = field(default_factory=dict)
    """State input -> steps whose value lies outside the contract's low/high (the model sees it beyond +-1)."""
    state_age_p50_s: dict[str, float | None] = field(default_factory=dict)
    """State input -> median age of its value at the decision moment (None: no step written)."""
    state_age_p99_s: dict[str, float | None] = field(default_factory=dict)
    instructions: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class BagResult:
    report: BagReport
    episodes: list[ConvertedEpisode]


@dataclass
class Span:
    """A time window of a bag that becomes one episode (or several, if stale steps cut it)."""

    start_ns: int
    end_ns: int
    instruction: str | None = None
    success: bool | None = None
    """Outcome from the success topic: True (a True message ended the span) or False (its last message said False)."""
    ended_by_success: bool = False


# ---------------------------------------------------------------------------------------------
# pass 1: small topics -> spans and action streams
# ---------------------------------------------------------------------------------------------

def _check_topics(bag: BagReader, cfg: ConvertConfig) -> None:
    c = cfg.contract
    for cam in c.cameras:
        bag.require_topic(cam.topic, (cam.msg_type,), f"camera '{cam.name}'")
    for group in group_dims_by_topic(c.action_dims, "source"):
        dims = ", ".join(c.action_dims[i].name for i in group.dim_indices)
        bag.require_topic(group.topic, (group.msg_type,), f"action ({dims}) source")
    for s in c.state_inputs:
        bag.require_topic(s.source.topic, (s.source.msg_type,), f"state input '{s.name}'")
    info = bag.info
    assert info is not None
    if c.instruction.topic and c.instruction.topic in info.topics and cfg.instruction is None:
        bag.require_topic(c.instruction.topic, INSTRUCTION_MSG_TYPES, "instruction")
    if c.success.topic and c.success.topic in info.topics:
        bag.require_topic(c.success.topic, SUCCESS_MSG_TYPES, "success")
    if cfg.split.mode == "topic":
        if cfg.split.topic not in info.topics:
            raise BagError(f"{bag.path}: episode topic {cfg.split.topic} (--episode-split) is not in the bag; "
                           f"the bag has: {info.describe_topics()}")


class SmallTopics(NamedTuple):
    """Pass 1's reading of a bag: everything but the camera images."""

    streams: list[DimStream]
    """Per action dim, its source field's values over time."""
    states: list[DimStream]
    """Per state input (contract order), its field's values over time (NaN/inf kept: such steps are dropped)."""
    command_ns: np.ndarray
    """Receive times of the messages on the ``absolute`` dims' source topics (the commands), sorted."""
    step_frames_ns: np.ndarray
    """Receive times of the step camera's frames (the contract's first camera), sorted; not decoded."""
    instructions: list[tuple[int, str]]
    successes: list[tuple[int, bool]]
    markers: list[tuple[int, Any]]
    """Episode marker messages (``--episode-split topic:``)."""


def _read_small_topics(bag: BagReader, cfg: ConvertConfig) -> SmallTopics:
    """Pass 1: per-dim value streams, command and step-frame times, instruction, success and marker events."""
    c = cfg.contract
    info = bag.info
    assert info is not None
    groups = group_dims_by_topic(c.action_dims, "source")
    command_topics = {c.action_dims[i].source.topic for i, d in enumerate(c.action_dims) if d.mode == "absolute"}
    step_topic = c.cameras[0].topic
    ins_topic = c.instruction.topic if (c.instruction.topic in info.topics and cfg.instruction is None) else None
    suc_topic = c.success.topic if c.success.topic in info.topics else None
    ep_topic = cfg.split.topic if cfg.split.mode == "topic" else None
    state_readers = {topic: _StateTopicReader(bag.path, topic, [(i, s) for i, s in enumerate(c.state_inputs)
                                                                if s.source.topic == topic])
                     for topic in dict.fromkeys(s.source.topic for s in c.state_inputs)}
    topics = [g.topic for g in groups] + list(state_readers) + [t for t in (step_topic, ins_topic, suc_topic, ep_topic) if t]
    dim_t: list[list[int]] = [[] for _ in c.action_dims]
    dim_v: list[list[float]] = [[] for _ in c.action_dims]
    first_error: list[str | None] = [None] * len(c.action_dims)
    command_t: list[int] = []
    step_t: list[int] = []
    instructions: list[tuple[int, str]] = []
    successes: list[tuple[int, bool]] = []
    markers: list[tuple[int, Any]] = []
    by_topic = {g.topic: g for g in groups}
    for topic, t, raw in bag.messages(list(dict.fromkeys(topics))):
        if topic == step_topic:
            step_t.append(t)  # only its time: images are decoded in pass 2, and only those a step selects
            if topic not in by_topic and topic not in state_readers and topic not in (ins_topic, suc_topic, ep_topic):
                continue
        msg = bag.deserialize(raw, topic)
        if topic in state_readers:
            state_readers[topic].add(t, msg)
        group = by_topic.get(topic)
        if group is not None:
            for i, ref in zip(group.dim_indices, group.refs):
                try:
                    v = read_field(msg, ref)
                except FieldError as e:  # e.g. a JointState holding only the gripper joint
                    first_error[i] = first_error[i] or str(e)
                    continue
                dim_t[i].append(t)
                dim_v[i].append(v)
            if topic in command_topics:
                command_t.append(t)
        if topic == ins_topic:
            instructions.append((t, str(msg.data)))
        if topic == suc_topic:
            successes.append((t, bool(msg.data)))
        if topic == ep_topic:
            markers.append((t, msg))
    streams = []
    for i, d in enumerate(c.action_dims):
        if not dim_t[i]:
            why = first_error[i] or "no messages"
            raise BagError(f"{bag.path}: action dim '{d.name}': no value read from topic {d.source.topic} field "
                           f"'{d.source.field}': {why}")
        times = np.asarray(dim_t[i], dtype=np.int64)
        order = np.argsort(times, kind="stable")
        streams.append(DimStream(times[order], np.asarray(dim_v[i], dtype=np.float64)[order]))
    by_input = {i: stream for reader in state_readers.values() for i, stream in reader.streams().items()}
    states = [by_input[i] for i in range(len(c.state_inputs))]
    return SmallTopics(streams, states, np.sort(np.asarray(command_t, dtype=np.int64)),
                       np.sort(np.asarray(step_t, dtype=np.int64)), instructions, successes, markers)


class _StateTopicReader:
    """The state inputs read from one topic: their values over time, and errors that name bag, topic and field.

    A field that does not exist or is not a number is an error at the first message (it is wrong in
    every message); a joint missing from some messages is not (arm and gripper may be published as
    separate JointState messages on one topic), only from all of them."""

    def __init__(self, bag_path: Path, topic: str, inputs: list[tuple[int, StateInputSpec]]) -> None:
        self.bag_path, self.topic, self.inputs = bag_path, topic, inputs
        self.times: dict[int, list[int]] = {i: [] for i, _ in inputs}
        self.values: dict[int, list[float]] = {i: [] for i, _ in inputs}
        self.missing_joint: dict[int, str] = {}
        self.messages = 0

    def add(self, t: int, msg: Any) -> None:
        self.messages += 1
        for i, spec in self.inputs:
            try:
                value = read_field(msg, spec.source)
            except JointNotInMessage as e:
                self.missing_joint.setdefault(i, str(e))
                continue
            except FieldError as e:
                raise BagError(f"{self.bag_path}: state input '{spec.name}': message at t={t / NS:.3f}s: {e}") from None
            self.times[i].append(t)
            self.values[i].append(value)

    def streams(self) -> dict[int, DimStream]:
        out = {}
        for i, spec in self.inputs:
            if not self.times[i]:
                why = self.missing_joint.get(i) or f"no messages on topic {self.topic}"
                raise BagError(f"{self.bag_path}: state input '{spec.name}': no value read from topic {self.topic} "
                               f"field '{spec.source.field}' in {self.messages} message(s): {why}")
            times = np.asarray(self.times[i], dtype=np.int64)
            order = np.argsort(times, kind="stable")
            out[i] = DimStream(times[order], np.asarray(self.values[i], dtype=np.float64)[order])
        return out


def _base_spans(info: BagInfo, streams: list[DimStream], markers: list[tuple[int, Any]], split: EpisodeSplit,
                extra_times: Sequence[int] = ()) -> list[tuple[int, int]]:
    if split.mode == "bag":
        return [(info.start_ns, info.end_ns)]
    if split.mode == "gap":  # pauses in the commands (instruction and success messages count as activity)
        times = np.unique(np.concatenate([s.times_ns for s in streams] + [np.asarray(extra_times, np.int64)]))
        cuts = np.flatnonzero(np.diff(times) > int(split.gap_s * NS))
        starts = np.concatenate([[0], cuts + 1])
        stops = np.concatenate([cuts, [len(times) - 1]])
        spans = [(int(times[a]), int(times[b])) for a, b in zip(starts, stops)]
        spans[0] = (min(spans[0][0], info.start_ns), spans[0][1])
        spans[-1] = (spans[-1][0], max(spans[-1][1], info.end_ns))
        return spans
    # topic markers
    if not markers:
        raise BagError(f"{info.path}: episode topic {split.topic} has no messages")
    if all(hasattr(m, "data") and isinstance(m.data, (bool, np.bool_)) for _, m in markers):
        spans, start = [], None
        for t, m in markers:
            if bool(m.data) and start is None:
                start = t
            elif not bool(m.data) and start is not None:
                spans.append((start, t))
                start = None
        if start is not None:
            spans.append((start, info.end_ns))
        return spans
    times = [t for t, _ in markers]
    bounds = [info.start_ns] + times + [info.end_ns]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _fallback_instruction(info: BagInfo, cfg: ConvertConfig) -> str | None:
    if cfg.instruction is not None:
        return cfg.instruction
    meta = info.custom_data.get("instruction")
    if meta:
        return meta
    return cfg.contract.instruction.fixed_text


def build_spans(info: BagInfo, streams: list[DimStream], instructions: list[tuple[int, str]],
                successes: list[tuple[int, bool]], markers: list[tuple[int, Any]], cfg: ConvertConfig,
                dropped: Counter) -> list[Span]:
    """Cut a bag into episode spans: base split, then instruction changes, then success messages."""
    period = cfg.contract.control_period_s
    fallback = _fallback_instruction(info, cfg)
    spans: list[Span] = []
    extra = [t for t, _ in instructions] + [t for t, _ in successes]
    for start, end in _base_spans(info, streams, markers, cfg.split, extra):
        # instruction in force at `start`, then cuts at every change inside the span
        cur = None
        for t, text in instructions:
            if t <= start:
                cur = text
        pieces: list[tuple[int, int, str | None]] = []
        piece_start = start
        for t, text in instructions:
            if start < t <= end and text != cur:
                if t > piece_start:
                    pieces.append((piece_start, t, cur))
                piece_start, cur = t, text
        pieces.append((piece_start, end, cur))
        for a, b, text in pieces:
            text = text if text is not None else fallback
            if text is None and not cfg.contract.instruction.allow_none:
                dropped["before the first instruction (no instruction topic message, --instruction or fixed_text)"] += int((b - a) / NS / period)
                continue
            spans.append(_apply_outcome(Span(a, b, instruction=text), successes, period, dropped))
    return spans


def _apply_outcome(span: Span, successes: list[tuple[int, bool]], period_s: float, dropped: Counter) -> Span:
    """Success-topic messages inside the span: the first True ends it (success); otherwise, when the last
    message says False, the episode ends there as a failure (a robot that reports False every step,
    as the sim does, ends on its last report)."""
    last_false = None
    for t, ok in successes:
        if span.start_ns <= t <= span.end_ns:
            if ok:
                dropped["after the success message"] += int((span.end_ns - t) / NS / period_s)
                span.end_ns, span.success, span.ended_by_success = t, True, True
                return span
            span.success, last_false = False, t
    if last_false is not None:
        dropped["after the failure message"] += int((span.end_ns - last_false) / NS / period_s)
        span.end_ns = last_false
    return span


class Label(NamedTuple):
    """An episode's success label and whether it is a verdict (terminal) or a default (truncated)."""

    success: bool | None
    """None: unlabeled."""
    verdict: bool
    """True when a labels file, --success/--failure or the success topic says so: the episode ends there
    (a terminal transition). False for --unlabeled failure: a cut, which bootstraps (truncation)."""


def _label(span: Span, index: int, path: Path, cfg: ConvertConfig) -> Label:
    """Labels file > --success/--failure > success topic > --unlabeled failure; None = unlabeled."""
    if cfg.labels is not None:
        lab = cfg.labels.lookup(path, index)
        if lab is not None:
            return Label(lab, True)
    if cfg.success is not None:
        return Label(cfg.success, True)
    if span.success is not None:
        return Label(span.success, True)
    if cfg.unlabeled == "failure":
        return Label(False, False)
    return Label(None, False)


class SpanSteps(NamedTuple):
    """A span's steps before validity checks: the plan, plus why a whole span yields nothing."""

    plan: StepPlan | None
    """None when the span yields no steps (``skipped`` says why)."""
    skipped: str = ""


def _empty_plan() -> StepPlan:
    z = np.zeros(0, np.int64)
    return StepPlan(z, z, z, 0, np.zeros(0, bool), 0)


def plan_span(span: Span, label: Label, small: SmallTopics, cfg: ConvertConfig, dropped: Counter) -> StepPlan:
    """The pairing rule applied to one span (``sync.plan_steps``), with every left-out step counted."""
    c = cfg.contract
    period_ns = int(round(c.control_period_s * NS))
    n_nominal = int((span.end_ns - span.start_ns) // period_ns)
    if label.success is None:  # --unlabeled skip
        dropped["unlabeled episode (--unlabeled skip)"] += n_nominal
        return _empty_plan()
    f = small.step_frames_ns
    frames = f[(f >= span.start_ns) & (f <= span.end_ns)]
    if len(frames) == 0:
        dropped[f"no frame from the step camera '{c.cameras[0].name}' in the episode"] += n_nominal
        return _empty_plan()
    plan = plan_steps(frames, small.command_ns, period_ns, span.end_ns, max_gap_ns=int(cfg.frame_age_limit_s * NS))
    if plan.cut and len(plan.decision_ns) == 0:
        dropped["no command answered any frame of the episode"] += plan.cut
    elif plan.cut:
        end = "the success message" if span.ended_by_success else "the end of the episode"
        dropped[f"final observation: no command answered it before {end}"] += plan.cut
    return plan


def build_episodes(spans: list[Span], labels: list[Label], plans: list[StepPlan], small: SmallTopics,
                   frames: dict[str, np.ndarray], frame_t: dict[str, np.ndarray], path: Path, identity: str,
                   cfg: ConvertConfig, dropped: Counter, notes: Counter) -> list[ConvertedEpisode]:
    """Validity per step (stale or missing frames, missing commands), runs of valid steps -> episodes.

    Only the last run of a span carries its label; a verdict makes its last step terminal (the failing
    or succeeding action kept, no bootstrap). Runs before a gap are cuts: truncated, not successful.
    """
    c = cfg.contract
    period_ns = int(round(c.control_period_s * NS))
    limit_ns = int(cfg.frame_age_limit_s * NS)
    episodes: list[ConvertedEpisode] = []
    offset = 0
    for si, (span, label, plan) in enumerate(zip(spans, labels, plans)):
        starts = plan.decision_ns
        k = len(starts)
        sl = slice(offset, offset + k)
        offset += k
        if k == 0:
            continue
        valid = np.ones(k, dtype=bool)
        reasons = np.full(k, "", dtype=object)
        for cam in c.cameras:
            ft = frame_t[cam.name][sl]
            none = ft < 0
            stale = ~none & (starts - ft > limit_ns)
            reasons[none & valid] = f"no frame yet from camera '{cam.name}'"
            valid &= ~none
            reasons[stale & valid] = f"stale frame from camera '{cam.name}' (> {cfg.frame_age_limit_s:g} s)"
            valid &= ~stale
        state, state_t = sample_states(small.states, c, starts, limit_ns, cfg.frame_age_limit_s, valid, reasons)
        actions = np.zeros((k, c.num_action_dims), dtype=np.float64)
        for i, (d, stream) in enumerate(zip(c.action_dims, small.streams)):
            sa = actions_for_steps(stream, plan, d.mode, period_ns)
            actions[:, i] = sa.values
            reasons[~sa.valid & valid] = f"no command yet for '{d.name}' on {d.source.topic}"
            valid &= sa.valid
            if cfg.max_action_age_s is not None:
                stale = sa.age_ns > int(cfg.max_action_age_s * NS)
                reasons[stale & valid] = f"stale command for '{d.name}' on {d.source.topic} (> {cfg.max_action_age_s:g} s)"
                valid &= ~stale
            n_held = int((sa.held & valid).sum())
            if n_held:
                notes[f"no new command for '{d.name}' in the step's response window (previous one held)"] += n_held
        for r in reasons[~valid]:
            dropped[r] += 1
        runs = _split_at(valid_runs(valid), plan.breaks)
        n_breaks = int(plan.breaks.sum())
        if n_breaks:
            notes[f"step camera '{c.cameras[0].name}' silent for > {cfg.frame_age_limit_s:g} s: episode cut there"] += n_breaks
        for ri, (a, b) in enumerate(runs):
            if b - a < cfg.min_steps:
                dropped[f"episode shorter than --min-steps {cfg.min_steps}"] += b - a
                continue
            last = ri == len(runs) - 1
            success = bool(label.success) if last else False
            terminal = last and label.verdict
            if not terminal:
                notes["truncated episodes (their last step is an observation without a training sample)"] += 1
            keep = np.arange(a, b)
            if cfg.keep_still_steps is not None:
                keep = keep[keep_still_steps(still_steps(actions[a:b], state[a:b], c), cfg.keep_still_steps)]
                if b - a > len(keep):
                    dropped[dropped_reason(cfg.keep_still_steps)] += b - a - len(keep)
            idx = sl.start + keep
            episodes.append(ConvertedEpisode(
                frames={name: frames[name][idx] for name in frames}, actions=actions[keep].astype(np.float32),
                success=success, terminal=terminal, instruction=span.instruction,
                source_id=f"{identity}:{si}:{ri}",
                decision_ns=starts[keep].copy(),
                frame_times_ns={cam.name: frame_t[cam.name][idx] for cam in c.cameras},
                state=state[keep].astype(np.float32) if c.state_dim else None,
                state_times_ns=state_t[keep].copy() if c.state_dim else None,
                metadata={"bag": str(path), "bag_name": bag_name(path), "episode_index": si, "run": ri,
                          "start_ns": int(starts[a]), "end_ns": int(plan.window_end_ns[b - 1]),
                          "control_rate_hz": c.control_rate_hz, "response_latency_s": plan.latency_ns / NS},
            ))
    return episodes


def sample_states(states: list[DimStream], contract: RobotContract, starts: np.ndarray, limit_ns: int,
                  limit_s: float, valid: np.ndarray, reasons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every state input at the decision moments ``starts`` (rule 2, ``sync.values_at``) -> values
    float64 (k, S) and their receive times int64 (k, S). Marks steps invalid in place, with the first
    reason: no value yet, a value older than the frame-age limit (a stale state input is as stale as a
    stale frame), or a non-finite value (never stored: the model must not learn from it)."""
    k = len(starts)
    values = np.zeros((k, contract.state_dim), dtype=np.float64)
    times = np.full((k, contract.state_dim), -1, dtype=np.int64)
    for j, (spec, stream) in enumerate(zip(contract.state_inputs, states)):
        sampled = values_at(stream, starts)
        values[:, j], times[:, j] = sampled.values, sampled.times_ns
        where = f"state input '{spec.name}' on {spec.source.topic}"
        none = sampled.times_ns < 0
        reasons[none & valid] = f"no value yet for {where}"
        valid &= ~none
        stale = sampled.age_ns(starts) > limit_ns
        reasons[stale & valid] = f"stale {where} (> {limit_s:g} s)"
        valid &= ~stale
        bad = ~np.isfinite(sampled.values)
        reasons[bad & valid] = f"non-finite {where} (NaN/inf in the bag)"
        valid &= ~bad
    return values, times


def _split_at(runs: list[tuple[int, int]], breaks: np.ndarray) -> list[tuple[int, int]]:
    """Split runs ``[a, b)`` after every step i with ``breaks[i]``."""
    out = []
    for a, b in runs:
        for i in range(a, b - 1):
            if breaks[i]:
                out.append((a, i + 1))
                a = i + 1
        out.append((a, b))
    return out


def summarize(report: BagReport, episodes: list[ConvertedEpisode], contract: RobotContract,
              dropped: Counter, notes: Counter) -> None:
    """Fill the bag's report from its episodes: counts, drops with reasons, frame ages, action ranges."""
    report.episodes = len(episodes)
    report.successes = sum(e.success for e in episodes)
    report.steps = sum(len(e.actions) for e in episodes)
    report.dropped = {k: int(v) for k, v in dropped.items() if v}
    report.notes = {k: int(v) for k, v in notes.items() if v}
    for cam in contract.cameras:
        ages = AgeStats()
        for e in episodes:
            ages.add(e.decision_ns - e.frame_times_ns[cam.name])
        report.frame_age_p50_s[cam.name] = ages.percentile(50)
        report.frame_age_p99_s[cam.name] = ages.percentile(99)
    report.instructions = sorted({e.instruction for e in episodes if e.instruction is not None})
    _summarize_state(report, episodes, contract)
    if episodes:
        acts = np.concatenate([e.actions for e in episodes])
        report.action_min = acts.min(axis=0).tolist()
        report.action_max = acts.max(axis=0).tolist()
        report.clipped.update(outside_range(acts, contract.action_dims))
    else:
        report.status = "no episodes"
        report.error = report.error or ("; ".join(f"{n} step(s): {r}" for r, n in sorted(report.dropped.items()))
                                        or "no steps in the bag")


def _summarize_state(report: BagReport, episodes: list[ConvertedEpisode], contract: RobotContract) -> None:
    """Per state input: the range of values stored against the contract's low/high, and their ages."""
    if not contract.state_dim:
        return
    for j, spec in enumerate(contract.state_inputs):
        ages = AgeStats()
        for e in episodes:
            ages.add(e.decision_ns - e.state_times_ns[:, j])
        report.state_age_p50_s[spec.name] = ages.percentile(50)
        report.state_age_p99_s[spec.name] = ages.percentile(99)
    if not episodes:
        return
    values = np.concatenate([e.state for e in episodes]).astype(np.float64)
    report.state_min = values.min(axis=0).tolist()
    report.state_max = values.max(axis=0).tolist()
    report.state_outside.update(outside_range(values, contract.state_inputs))


def outside_range(values: np.ndarray, specs: Sequence[Any]) -> dict[str, int]:
    """Column j of ``values`` against ``specs[j]``'s [low, high] (action dims, state inputs): name -> how
    many values lie outside, for the columns with any (the reports' clipping and range lines)."""
    out = {}
    for j, spec in enumerate(specs):
        n = int(((values[:, j] < spec.low) | (values[:, j] > spec.high)).sum())
        if n:
            out[spec.name] = n
    return out


# ---------------------------------------------------------------------------------------------
# one bag
# ---------------------------------------------------------------------------------------------

def convert_bag(path: str | Path, cfg: ConvertConfig) -> BagResult:
    """Convert one bag into episodes (nothing is written here); raises BagError on bad input."""
    path = Path(path)
    report = BagReport(bag=str(path))
    c = cfg.contract
    with BagReader(path) as bag:
        info = bag.info
        assert info is not None
        report.identity = info.identity()
        if report.identity in cfg.known_bags:
            report.status = "already in dataset"
            return BagResult(report, [])
        _check_topics(bag, cfg)
        small = _read_small_topics(bag, cfg)
        dropped: Counter = Counter()
        notes: Counter = Counter()
        spans = build_spans(info, small.streams, small.instructions, small.successes, small.markers, cfg, dropped)
        labels = [_label(s, i, path, cfg) for i, s in enumerate(spans)]
        if cfg.unlabeled == "refuse" and any(lab.success is None for lab in labels):
            missing = [i for i, lab in enumerate(labels) if lab.success is None]
            src = f"no message on {c.success.topic}" if c.success.topic else "the contract has no success topic"
            raise BagError(
                f"{path}: episode(s) {missing} have no success label ({src}, not in the labels file, no "
                f"--success/--failure); pass --labels, --success/--failure or --unlabeled failure|skip"
            )
        plans = [plan_span(span, lab, small, cfg, dropped) for span, lab in zip(spans, labels)]
        all_decisions = np.concatenate([p.decision_ns for p in plans]) if plans else np.zeros(0, np.int64)
        frames, frame_t = _select_frames(bag, cfg, all_decisions)
    episodes = build_episodes(spans, labels, plans, small, frames, frame_t, path, report.identity, cfg, dropped, notes)
    summarize(report, episodes, c, dropped, notes)
    return BagResult(report, episodes)


def _select_frames(bag: BagReader, cfg: ConvertConfig, steps_ns: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pass 2: stream camera topics, decode the frames the steps select -> (frames, frame times)."""
    c = cfg.contract
    k = len(steps_ns)
    frames = {cam.name: np.zeros((k, 3, cam.height, cam.width), dtype=np.uint8) for cam in c.cameras}
    frame_t = {cam.name: np.full(k, -1, dtype=np.int64) for cam in c.cameras}
    if k == 0:
        return frames, frame_t
    cams = {cam.topic: cam for cam in c.cameras}
    selectors = {cam.topic: LatestFrameSelector(steps_ns) for cam in c.cameras}
    decoded: dict[str, tuple[int, np.ndarray] | None] = {t: None for t in cams}

    def assign(topic: str, picks: Iterator[tuple[int, int, Any]]) -> None:
        cam = cams[topic]
        for step, t_frame, raw in picks:
            last = decoded[topic]
            if last is None or last[0] != t_frame:
                msg = bag.deserialize(raw, topic)
                where = f"{bag.path}: camera '{cam.name}' topic {topic} message at t={t_frame / NS:.3f}s"
                last = (t_frame, frame_from_msg(msg, cam, where=where))
                decoded[topic] = last
            frames[cam.name][step] = last[1]
            frame_t[cam.name][step] = t_frame

    last_step = int(steps_ns[-1])
    for topic, t, raw in bag.messages(list(cams)):
        assign(topic, selectors[topic].push(t, raw))
        if t > last_step and all(s.done for s in selectors.values()):
            break
    for topic, sel in selectors.items():
        assign(topic, sel.finish())
    return frames, frame_t


def _convert_job(job: tuple[str, ConvertConfig, bool]) -> BagResult:
    """Worker entry: one bag; with on_error=skip a bad bag becomes an error report instead of raising."""
    path, cfg, skip_errors = job
    try:
        return convert_bag(path, cfg)
    except (BagError, ImageError, FieldError, LabelsError) as e:
        if not skip_errors:
            raise BagError(str(e)) from None
        return BagResult(BagReport(bag=path, status="error", error=str(e)), [])


# ---------------------------------------------------------------------------------------------
# many bags -> one transaction per bag
# ---------------------------------------------------------------------------------------------

def run_conversion(bags: Sequence[Path], out: Path, cfg: ConvertConfig, workers: int = 1,
                   on_error: str = "abort", progress: bool = True) -> list[BagReport]:
    """Convert ``bags`` into the dataset at ``out``, one transaction per bag; returns one report per bag.

    Each bag is all or nothing; bags already committed stay when a later one fails (``on_error='abort'``
    stops there) or the process is killed, and a rerun skips them and converts the rest: the result is
    byte for byte what one uninterrupted run writes. A dataset folder this call created and left
    without episodes is removed again.
    """
    from tqdm import tqdm

    from q_transformer_ros.replay import EpisodeData, ReplayWriter

    if on_error not in ON_ERROR_CHOICES:
        raise ConvertError(f"--on-error {on_error!r}: use one of {ON_ERROR_CHOICES}")
    out = Path(out)
    created = not out.exists()
    reports: list[BagReport] = []
    try:
        with ReplayWriter(out, cfg.contract, create_ok=True) as writer:
            known = frozenset(s.split(":", 1)[0] for s in writer.manifest.source_ids() if s)
            job_cfg = ConvertConfig(**{**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__}, "known_bags": known})
            jobs = [(str(b), job_cfg, on_error == "skip") for b in bags]
            bar = tqdm(total=len(jobs), unit="bag", desc="convert_bag", disable=not progress, file=sys.stderr)
            for result in _results(jobs, workers):
                if result.episodes:
                    with writer.transaction() as tx:  # one bag: all or nothing; committed bags survive a kill
                        for ep in result.episodes:
                            tx.add_episode(EpisodeData(
                                frames=ep.frames, actions=ep.actions, success=ep.success, terminal=ep.terminal,
                                instruction=ep.instruction, source_id=ep.source_id, metadata=ep.metadata,
                                state=ep.state,
                            ))
                reports.append(result.report)
                bar.update(1)
                bar.set_postfix(steps=sum(r.steps for r in reports))
            bar.close()
    except BaseException:
        if created and out.exists() and not dataset_has_episodes(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    if created and not any(r.episodes for r in reports) and not dataset_has_episodes(out):
        shutil.rmtree(out, ignore_errors=True)
    return reports


def dataset_has_episodes(out: Path) -> bool:
    """True when the dataset at ``out`` has committed episodes (what decides whether a failed first run
    may remove the folder it created); shared with lerobot_import."""
    try:
        return bool(json.loads((out / "manifest.json").read_text()).get("episodes"))
    except (OSError, ValueError):
        return False


def _results(jobs: list[tuple[str, ConvertConfig, bool]], workers: int) -> Iterator[BagResult]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _convert_job(job)
        return
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads (tqdm, torch)
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_convert_job, jobs)


# ---------------------------------------------------------------------------------------------
# report and CLI
# ---------------------------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(reports: Sequence[BagReport], contract: RobotContract, source: str = "bag") -> str:
    """The final per-bag table plus every loss with its reason, notes, clipping and errors (``source``
    names the first column: ``bag``, or ``dataset`` for ``lerobot_import``)."""
    lines = []
    header = f"{source:<32} {'status':<18} {'eps':>4} {'succ':>4} {'steps':>6} {'dropped':>7}  frame age p50/p99 (s)"
    lines.append(header)
    lines.append("-" * len(header))
    for r in reports:
        ages = " ".join(f"{n}={_seconds(r.frame_age_p50_s.get(n))}/{_seconds(r.frame_age_p99_s.get(n))}"
                        for n in r.frame_age_p50_s)
        name = Path(r.bag).name[-32:]
        lines.append(f"{name:<32} {r.status:<18} {r.episodes:>4} {r.successes:>4} {r.steps:>6} "
                     f"{sum(r.dropped.values()):>7}  {ages}")
    lines.append("-" * len(header))
    lines.append(f"{'total':<32} {'':<18} {sum(r.episodes for r in reports):>4} {sum(r.successes for r in reports):>4} "
                 f"{sum(r.steps for r in reports):>6} {sum(sum(r.dropped.values()) for r in reports):>7}")
    for r in reports:
        name = Path(r.bag).name
        if r.error:
            lines.append(f"{'ERROR' if r.status == 'error' else 'NO EPISODES'} {name}: {r.error}")
        for reason, n in sorted(r.dropped.items()):
            lines.append(f"  {name}: dropped {n} step(s): {reason}")
        for note, n in sorted(r.notes.items()):
            lines.append(f"  {name}: note: {n} x {note}")
        if r.action_min:
            for i, d in enumerate(contract.action_dims):
                lo, hi = r.action_min[i], r.action_max[i]
                if d.name in r.clipped:
                    lines.append(f"  WARNING {name}: action '{d.name}' seen in [{lo:.4g}, {hi:.4g}], contract range "
                                 f"[{d.low:g}, {d.high:g}]: {r.clipped[d.name]} step(s) will be clipped")
    if any(r.action_min for r in reports):
        lines.append("action range seen vs contract:")
        mins = np.min([r.action_min for r in reports if r.action_min], axis=0)
        maxs = np.max([r.action_max for r in reports if r.action_max], axis=0)
        for i, d in enumerate(contract.action_dims):
            flag = "  CLIPPED" if mins[i] < d.low or maxs[i] > d.high else ""
            lines.append(f"  {d.name:<16} seen [{mins[i]:>9.4g}, {maxs[i]:>9.4g}]  contract [{d.low:>9.4g}, {d.high:>9.4g}]{flag}")
    lines.extend(_state_report_lines(reports, contract))
    return "\n".join(lines)


def _state_report_lines(reports: Sequence[BagReport], contract: RobotContract) -> list[str]:
    """State inputs: the range seen in all bags vs the contract's low/high (what the model maps to
    [-1, 1]), flagged when outside, with the values' age at the decision moment (p50/p99 over bags)."""
    seen = [r for r in reports if r.state_min]
    if not contract.state_dim or not seen:
        return []
    lines = ["state range seen vs contract (the model sees low..high as -1..1):"]
    mins = np.min([r.state_min for r in seen], axis=0)
    maxs = np.max([r.state_max for r in seen], axis=0)
    for j, s in enumerate(contract.state_inputs):
        outside = sum(r.state_outside.get(s.name, 0) for r in seen)
        flag = f"  OUTSIDE in {outside} step(s)" if outside else ""
        p50 = [r.state_age_p50_s.get(s.name) for r in seen if r.state_age_p50_s.get(s.name) is not None]
        p99 = [r.state_age_p99_s.get(s.name) for r in seen if r.state_age_p99_s.get(s.name) is not None]
        age = f"  age p50/p99 {_seconds(float(np.median(p50)) if p50 else None)}/{_seconds(max(p99) if p99 else None)} s"
        lines.append(f"  {s.name:<16} seen [{mins[j]:>9.4g}, {maxs[j]:>9.4g}]  contract [{s.low:>9.4g}, {s.high:>9.4g}]"
                     f"{age}{flag}")
    return lines


def report_json(reports: Sequence[BagReport]) -> str:
    """The reports as strict JSON (no NaN or Infinity: a missing statistic is null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps([clean(asdict(r)) for r in reports], indent=2, allow_nan=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_bag",
        description="Convert rosbag2 / ROS 1 recordings into a Q-Transformer replay dataset (one transaction "
                    "per bag: a bag is all or nothing; re-runs skip bags already converted).",
    )
    p.add_argument("inputs", nargs="+", help="bags: rosbag2 directories, .mcap/.db3/.bag files, or folders of bags")
    p.add_argument("--out", required=True, type=Path, help="replay dataset folder (created, or appended to)")
    p.add_argument("--contract", type=Path, help="robot contract YAML (default: the one inside an existing --out)")
    p.add_argument("--instruction", help="instruction for every episode (overrides the instruction topic)")
    p.add_argument("--labels", type=Path, help="CSV/YAML file: bag -> success")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--success", dest="success", action="store_const", const=True, default=None,
                     help="label every episode not in --labels a success")
    lab.add_argument("--failure", dest="success", action="store_const", const=False,
                     help="label every episode not in --labels a failure")
    p.add_argument("--unlabeled", choices=UNLABELED_CHOICES, default="refuse",
                   help="episodes with no label from any source: refuse (error, default), failure, or skip")
    p.add_argument("--episode-split", default="bag", help="bag (default) | topic:<topic> | gap:<seconds>")
    p.add_argument("--max-frame-age", type=float, default=None,
                   help="seconds; older frames make a step stale (default: the contract's max_frame_age_s)")
    p.add_argument("--max-action-age", type=float, default=None,
                   help="seconds; older commands make a step stale (default: commands hold until replaced)")
    p.add_argument("--min-steps", type=int, default=1, help="drop episodes shorter than this")
    p.add_argument("--keep-still-steps", type=int, default=None, metavar="K",
                   help="keep only the first K steps of every stretch where the state inputs stand still and the "
                        "command repeats (an operator waiting after a failed try); default: keep every step")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (one bag each)")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="abort",
                   help="abort (default: write nothing) or skip bad bags and report them")
    p.add_argument("--report-json", type=Path, help="also write the per-bag report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def contract_from_dataset(out: Path) -> RobotContract:
    """The contract embedded in an existing dataset (when --contract is not given)."""
    from q_transformer_ros.replay.format import read_manifest

    return read_manifest(out).robot_contract(str(out / "manifest.json"))


def write_report_json(path: Path, reports: Sequence[BagReport]) -> None:
    """``--report-json``: the strict-JSON report, written to a temp file then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(report_json(reports))
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``convert_bag`` entry point; returns the exit status (0 ok, 1 conversion error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.contract is not None:
            contract = load_contract(args.contract)
        elif (args.out / "manifest.json").exists():
            contract = contract_from_dataset(args.out)
        else:
            raise ConvertError("--contract is required when --out is not an existing dataset")
        bags = find_bags(args.inputs)
        labels = load_labels(args.labels) if args.labels is not None else None
        if labels is not None:
            labels.check_bags_exist(bags)
        cfg = ConvertConfig(
            contract=contract, instruction=args.instruction, success=args.success, labels=labels,
            unlabeled=args.unlabeled, split=EpisodeSplit.parse(args.episode_split),
            max_frame_age_s=args.max_frame_age, max_action_age_s=args.max_action_age, min_steps=args.min_steps,
            keep_still_steps=args.keep_still_steps,
        )
        if args.workers < 1:
            raise ConvertError(f"--workers {args.workers}: must be >= 1")
        reports = run_conversion(bags, args.out, cfg, workers=args.workers, on_error=args.on_error,
                                 progress=not args.no_progress)
    except (ConvertError, BagError, LabelsError, ContractError, ImageError, FieldError) as e:
        print(f"convert_bag: error: {e}", file=sys.stderr)
        print(f"convert_bag: bags converted before the error stay in {args.out}; the failing bag wrote nothing",
              file=sys.stderr)
        return 1
    except ValueError as e:  # DatasetError and friends: already name the dataset
        print(f"convert_bag: error: {e}", file=sys.stderr)
        return 1
    print(format_report(reports, contract))
    if args.report_json is not None:
        write_report_json(args.report_json, reports)
    return 0 if not any(r.status == "error" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
