"""The end-to-end demo's knobs in one validated dataclass, and where its outputs go.

Why one dataclass: every stage reads the same sizes, and each stage's done-marker stores the part
of it that determines the stage's output, so a rerun with other knobs redoes exactly the stages
whose inputs changed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from q_transformer_ros.control.loop import check_beam_margin
from q_transformer_ros.sim.tasks import DEMO_TASKS, TASK_INSTRUCTIONS

STAGES = ("record", "convert", "train", "eval", "report")
"""The demo's stages, in order; each one's output is the next one's input."""
EVAL_SEED_OFFSET = 1000
"""Closed-loop episodes use layout seeds from here on: never seen in the recorded data (seeds 0..N-1)."""


def default_contract_path() -> Path:
    """``config/contract_ee_arm.yaml`` (the sim bridge's contract): installed share dir, else the checkout."""
    name = "contract_ee_arm.yaml"
    candidates = []
    if os.environ.get("QTR_REPO_ROOT"):
        candidates.append(Path(os.environ["QTR_REPO_ROOT"]) / "config" / name)
    candidates.append(Path(__file__).resolve().parents[2] / "config" / name)
    try:
        from ament_index_python.packages import get_package_share_directory  # noqa: PLC0415

        candidates.append(Path(get_package_share_directory("q_transformer_ros")) / "config" / name)
    except Exception:  # noqa: BLE001 - not installed through colcon
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"contract file {name} not found; looked in {[str(p) for p in candidates]}; pass --contract")


@dataclass
class DemoConfig:
    """Sizes and places of one end-to-end demo run."""

    out: Path = Path("demo_out")
    """Output folder: bags/, dataset/, train/, logs/, eval.jsonl, report.md, plots, GIF."""
    tasks: tuple[str, ...] = DEMO_TASKS
    """Meta-World tasks recorded, trained on and evaluated."""
    episodes_per_task: int = 20
    """Recorded episodes per task (layout seeds 0..N-1), cycling through ``noise_levels``."""
    noise_levels: tuple[float, ...] = (0.0, 0.25)
    """Std of the Gaussian noise on the operator's actions, per episode in turn. Why small: the mistakes
    that separate learning from copying come from ``operators``; noise of std 1-2 on a [-1, 1] action is
    mostly clipped to the end bins, whose mass then dominates every state's data, and both QT and BC learn
    to slam the arm at +-1 (benchmarks/README.md, "Learning, session 6":
    QT 0/30 and BC 8/30 with noise up to 2; QT 13/30 and BC 9/30 with 0 and 0.25, same tasks, episodes
    and steps)."""
    operators: tuple[str, ...] = ("expert", "expert", "wrong_target", "stop_short", "near_miss")
    """Operator style per episode in turn (``sim.operators``: expert, wrong_target, stop_short,
    release_early, near_miss): the recorded data then hold systematic mistakes, not only noise. Episode i
    of a task uses ``operators[i % len]`` with noise ``noise_levels[(i // len(operators)) % len]``. Why
    near misses: the learned policy's own failures are near misses (pressing the button's housing,
    missing a handle); without them in the data the value of those states is extrapolation, high on
    failures (session 7: value AUROC 0.2-0.53); benchmarks/README.md, "Learning, session 8"."""
    keep_still_steps: int | None = 2
    """The converter keeps only the first this many steps of every stretch in which the arm stands still and
    the command repeats (``convert_bag --keep-still-steps``; ``replay.still_steps``); None keeps every step.
    Why: an operator who stopped short or reached the wrong place stands there until the episode's time is
    up, 50-100 copies of one (frame, "stand still") pair per failed episode; both cloning and the
    conservative term then learn to stand still where those stretches were (benchmarks/README.md,
    "Learning, session 7")."""
    max_episode_steps: int = 120
    """Control steps after which an episode ends as a failure (recording and closed loop)."""
    train_steps: int = 4000
    """Optimizer steps of the training stage."""
    batch_size: int = 32
    """Training batch size."""
    model_preset: str = "tiny"
    """ModelConfig preset of the trained network."""
    objective: str = "q_learning"
    """Trainer objective: 'q_learning' (Q-Transformer) or 'bc'."""
    conservative_weight: float = 1.0
    """Weight of the Q-Transformer's conservative term (``learner.conservative_weight``; the paper's 1)."""
    text_encoder_weights: str | None = None
    """Local open_clip weights for the instruction encoder; None = a small seeded random text tower
    (the instructions of a few tasks stay distinct codes; no download needed)."""
    eval_episodes: int = 20
    """Closed-loop episodes per task, on held-out seeds (from EVAL_SEED_OFFSET). Why 20: at 10 per task
    (30 per arm) one run's QT-BC comparison flipped from run to run (session 6-7); 60 per arm narrows
    each Wilson interval by about a quarter, for ~2.5 minutes more on 2 cores."""
    beam_width: int = 8
    """Action decoding in the closed loop (``policy_node`` ``beam_width``), the same for the Q-Transformer and
    the cloning baseline: 1 = greedy per dim, k > 1 = beam search. The Q-Transformer's beam takes the action
    with the highest last-dim Q, cloning's the one with the highest summed log-probability (its outputs are
    a categorical's logits, not values). Why 8: five QT checkpoints trained on the demo's data, rolled out on
    its 60 held-out layouts, succeeded in 19-31 (mean 25.2) of 60 greedily, 28-33 at width 4 and 31-34 at
    width 8 (the data: 27), most of the gain on drawer-close; a decision costs ~3.3 ms instead of ~2.3 ms on
    one core (benchmarks/README.md, "Learning, session 10"). The seven cloning checkpoints of runs C-I: 93 of
    420 greedily, 88 at width 8 ("Learning, session 11"): the beam neither helps nor hurts cloning, and no
    decoding is given to one policy and withheld from the other. The price of the beam is the value: within
    a task its AUROC fell from 0.81 greedily to 0.56 (seven QT checkpoints, ``benchmarks/bench_decoding.py``);
    ``beam_margin`` is what pays it back."""
    beam_margin: float = 0.05
    """With ``beam_width`` > 1 the Q-Transformer acts on the beam's action only when its value beats the greedy
    action's by more than this (``policy_node`` ``beam_margin``; -1 = always the beam's). Cloning's beam is
    not guarded: its ranking is not a value. Why 0.05: on the seven QT checkpoints of runs C-I, 267 of 420
    successes (greedy 180, unguarded width 8 226) with value AUROC 0.78 (0.60 within a task; unguarded 0.76
    and 0.56); margins 0.02 and 0.1 gave 249 and 256 (benchmarks/README.md, "Learning, session 11"). Demo
    runs J-N with it: QT 166 of 300, BC 45, value AUROC 0.66, 0.86, 0.82, 0.74, 0.67 ("Learning, session 12")."""
    compare_bc: bool = True
    """Also train behaviour cloning (same data, network, steps and seed) and run it closed loop on the
    same seeds, so the table shows Q-learning next to cloning (``train_bc/``, ``eval_bc.jsonl``)."""
    contract: Path | None = None
    """Robot contract YAML; None = config/contract_ee_arm.yaml."""
    image_size: int | None = 32
    """Camera height = width in pixels for the whole run: the contract is copied to ``<out>/contract.yaml``
    with this camera size (the sim renders it, the model trains on it). None = the contract's own size.
    Why 32 by default: on 2 CPU cores a training step at 64x64 costs ~5x more, and the objects of the
    default tasks stay visible at 32x32."""
    sim_time: bool = True
    """Sim time: ``sim_node`` publishes /clock and steps as soon as the expert's or the policy's command
    arrives, every other node runs with ``use_sim_time`` (``sim.sim_clock``): recording and the closed loop
    run as fast as the loop allows instead of at the control rate, with the same stamps and message
    latencies a 10 Hz robot would show. False = a wall-clock sim at the control rate."""
    domain_id: int = -1
    """ROS_DOMAIN_ID of every node of the run; -1 = chosen from the process id (100..199)."""
    convert_workers: int = 2
    """Converter worker processes."""
    device: str = "cpu"
    """Torch device for training and the policy node."""
    seed: int = 0
    """Training seed and expert-noise seed."""
    torch_threads: int = 0
    """Torch intra-op threads for training; 0 = the trainer's automatic choice (one per core not already
    busy with other processes, measured at start: on a 2-core machine where another process keeps one core busy, 2-thread
    training runs ~10x slower than usual and 1 thread avoids that)."""
    progress: bool = True
    """tqdm progress bars."""
    extra_train_args: list[str] = field(default_factory=list)
    """Extra ``train`` flags (e.g. ``--set learner.conservative_weight=0``)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.tasks = tuple(self.tasks)
        self.noise_levels = tuple(float(x) for x in self.noise_levels)
        self.operators = tuple(self.operators)
        from q_transformer_ros.sim.operators import OPERATOR_STYLES  # noqa: PLC0415

        bad = [o for o in self.operators if o not in OPERATOR_STYLES]
        if not self.operators or bad:
            raise ValueError(f"DemoConfig.operators = {self.operators}: give styles from {OPERATOR_STYLES}")
        if not self.tasks:
            raise ValueError("DemoConfig.tasks is empty: name at least one Meta-World task")
        unknown = [t for t in self.tasks if t not in TASK_INSTRUCTIONS]
        if unknown:
            raise ValueError(f"DemoConfig.tasks: unknown Meta-World tasks {unknown}; known: {sorted(TASK_INSTRUCTIONS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"DemoConfig.tasks = {self.tasks}: a task is listed twice")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"DemoConfig.torch_threads = {self.torch_threads!r}: must be an integer >= 0")
        for key in ("episodes_per_task", "max_episode_steps", "train_steps", "batch_size", "eval_episodes",
                    "convert_workers", "beam_width"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DemoConfig.{key} = {v!r}: must be an integer >= 1")
        if self.keep_still_steps is not None and (not isinstance(self.keep_still_steps, int)
                                                  or isinstance(self.keep_still_steps, bool) or self.keep_still_steps < 0):
            raise ValueError(f"DemoConfig.keep_still_steps = {self.keep_still_steps!r}: an integer >= 0, or None (keep all)")
        if not self.noise_levels or any(not (x >= 0) for x in self.noise_levels):
            raise ValueError(f"DemoConfig.noise_levels = {self.noise_levels}: need at least one std >= 0")
        check_beam_margin(self.beam_margin, "DemoConfig.beam_margin")
        if not (isinstance(self.conservative_weight, (int, float)) and self.conservative_weight >= 0):
            raise ValueError(f"DemoConfig.conservative_weight = {self.conservative_weight!r}: must be a number >= 0")
        if self.objective not in ("q_learning", "bc"):
            raise ValueError(f"DemoConfig.objective = {self.objective!r}: 'q_learning' or 'bc'")
        if self.domain_id == -1:
            self.domain_id = 100 + os.getpid() % 100
        if not (0 <= self.domain_id <= 232):
            raise ValueError(f"DemoConfig.domain_id = {self.domain_id}: ROS_DOMAIN_ID must be in 0..232")
        if self.contract is None:
            self.contract = default_contract_path()
        self.contract = Path(self.contract)
        if not self.contract.is_file():
            raise ValueError(f"DemoConfig.contract = {str(self.contract)!r}: no such file")
        if self.image_size is not None and (not isinstance(self.image_size, int) or not 16 <= self.image_size <= 256
                                            or self.image_size % 16):
            raise ValueError(f"DemoConfig.image_size = {self.image_size!r}: a multiple of 16 in [16, 256], or None")

    def run_contract(self) -> Path:
        """The contract every node and stage of this run uses: ``contract`` itself, or (``image_size``)
        a copy in ``<out>/contract.yaml`` with that camera size, written atomically when it changes."""
        import yaml  # noqa: PLC0415

        from q_transformer_ros.contract import load_contract  # noqa: PLC0415

        path = self.out / "contract.yaml"
        if self.image_size is None or self.contract.resolve() == path.resolve():
            return self.contract  # already derived (run() swaps it in): deriving again must not change it
        data = yaml.safe_load(self.contract.read_text())
        for cam in data.get("cameras", []):
            cam["height"] = cam["width"] = self.image_size
        text = (f"# {self.contract.name} with cameras at {self.image_size}x{self.image_size} (written by the demo)\n"
                + yaml.safe_dump(data, sort_keys=False))
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".contract.yaml.tmp-{os.getpid()}")
            tmp.write_text(text)
            load_contract(tmp)  # validate before it replaces anything
            os.replace(tmp, path)
        return path

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A tiny run for tests and smoke checks: 1 task, 2 short episodes, a few training steps, 1 closed-loop episode."""
        base = dict(tasks=("drawer-close-v3",), episodes_per_task=2, noise_levels=(0.0, 0.5), max_episode_steps=25,
                    train_steps=4, batch_size=8, eval_episodes=1, image_size=32, compare_bc=False)
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes: Any) -> "DemoConfig":
        return replace(self, **changes)

    # -- per-episode plan ---------------------------------------------------------------------
    def record_plan(self) -> list[tuple[str, int, float]]:
        """(task, seed, noise std) of every recorded episode, task by task (the sim rebuilds its scene
        when the task changes, which costs seconds)."""
        n_ops = len(self.operators)
        return [(task, i, self.noise_levels[(i // n_ops) % len(self.noise_levels)])
                for task in self.tasks for i in range(self.episodes_per_task)]

    def operator_for(self, seed: int) -> str:
        """The operator style of recorded episode ``seed`` (layout seeds 0..N-1 of every task)."""
        return self.operators[seed % len(self.operators)]

    def eval_plan(self) -> list[tuple[str, int]]:
        """(task, held-out seed) of every closed-loop episode, task by task."""
        return [(task, EVAL_SEED_OFFSET + j) for task in self.tasks for j in range(self.eval_episodes)]

    # -- paths ----------------------------------------------------------------------------------
    @property
    def bags_dir(self) -> Path:
        return self.out / "bags"

    @property
    def record_log(self) -> Path:
        return self.out / "record.jsonl"

    @property
    def dataset_dir(self) -> Path:
        return self.out / "dataset"

    @property
    def train_dir(self) -> Path:
        return self.out / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint.pt"

    @property
    def eval_log(self) -> Path:
        return self.out / "eval.jsonl"

    @property
    def train_bc_dir(self) -> Path:
        return self.out / "train_bc"

    @property
    def checkpoint_bc(self) -> Path:
        return self.train_bc_dir / "checkpoint.pt"

    @property
    def eval_bc_log(self) -> Path:
        return self.out / "eval_bc.jsonl"

    @property
    def bc_domain_id(self) -> int:
        """ROS_DOMAIN_ID of the cloning closed loop, which runs next to the Q-Transformer's: a domain of its
        own, because each loop's sim_node is the clock (/clock) of its graph."""
        return self.domain_id + 1 if self.domain_id < 232 else self.domain_id - 1

    @property
    def logs_dir(self) -> Path:
        return self.out / "logs"

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["contract"] = str(self.out), str(self.contract)
        d["tasks"], d["noise_levels"], d["operators"] = list(self.tasks), list(self.noise_levels), list(self.operators)
        return d
