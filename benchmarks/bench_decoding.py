"""What the action decoding does to a trained policy: closed-loop success and value AUROC per beam width.

    python benchmarks/bench_decoding.py demo_out                                   # widths 1 2 4 8
    python benchmarks/bench_decoding.py demo_out_A demo_out_B --beam-widths 1 8
    python benchmarks/bench_decoding.py demo_out --policy bc --beam-widths 1 8      # the cloning checkpoint
    python benchmarks/bench_decoding.py demo_out --beam-widths 1 8 --beam-margins 0.05 0.1

Each argument is a demo output folder (``scripts/run_demo.sh --out``). Its checkpoint (``train/`` for the
Q-Transformer, ``train_bc/`` for cloning) is rolled out ROS-free (``QTransformerPolicy`` + the simulator,
one torch thread) on the held-out layouts its closed loop ran (``eval.jsonl``), so every width meets the
same layouts. Session 9 found the ROS-free loop agrees with the ROS one episode for episode when greedy;
under the beam, near-ties flip on small numeric differences and the two differ by a few episodes.

Why this script: beam search changes two things the demo's goal asks for at once. On seven demo checkpoints
it raised success above the data's rate and took the value's power to tell a task's successes from its
failures down to chance (benchmarks/README.md, "Learning, session 11"). Decide a width with both numbers.

``--beam-margins m``: also decode with a beam that overrides greedy only by a margin
(``QTransformerPolicy.decide(beam_width, beam_margin)``, the policy node's ``beam_margin``). At every step
both decodings run from the same state, and the beam's action (width ``--margin-width``) is taken only
when its value beats the greedy action's by more than m (session 11: more successes than either
decoding alone).

Table: per run and width, successes (Wilson 95 %), the value AUROC over all episodes, and the mean of the
per-task AUROCs (tasks with both outcomes: within a task, the value has to rank episodes, not tasks);
then all runs pooled. An episode's value is its mean over the first half of the step budget, as in the
demo's report (``e2e.report.value_window``); the last column is the AUROC of whole-episode means. Episodes are cached in ``<run>/decoding/<policy>_beam<k>.jsonl`` (``--force``
redoes); the table is also written to ``<first run>/decoding/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MUJOCO_GL", "egl")

# torch before MuJoCo in one process (the reverse order segfaults with torchvision)
import open_clip  # noqa: E402,F401
import torch  # noqa: E402
import torchvision.ops  # noqa: E402,F401

from q_transformer_ros.e2e.report import (  # noqa: E402
    EpisodeRecord, read_records, value_auroc, value_window, wilson_interval, write_records, write_text_atomic,
)

CHECKPOINT_DIRS = {"qt": "train", "bc": "train_bc"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="demo output folders (each with train/ and eval.jsonl)")
    p.add_argument("--beam-widths", type=int, nargs="+", default=[1, 2, 4, 8], help="1 = greedy")
    p.add_argument("--beam-margins", type=float, nargs="+", default=[],
                   help="also decode with the beam overriding greedy only when its value is higher by more than m")
    p.add_argument("--margin-width", type=int, default=8, help="the beam width the margin rows use")
    p.add_argument("--policy", choices=tuple(CHECKPOINT_DIRS), default="qt",
                   help="qt: the Q-Transformer checkpoint (beam ranked by Q); bc: the cloning one (by log-probability)")
    p.add_argument("--max-episode-steps", type=int, default=None,
                   help="default: the run's own (its report.json config), else 120")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: two rollouts fit on two cores)")
    p.add_argument("--force", action="store_true", help="roll out again instead of reading the cached episodes")
    args = p.parse_args(argv)
    for w in [*args.beam_widths, args.margin_width]:
        if w < 1:
            p.error(f"--beam-widths/--margin-width {w}: must be >= 1 (1 = greedy)")
    args.decodings = [Decoding(w) for w in args.beam_widths] + [Decoding(args.margin_width, m) for m in args.beam_margins]
    return args


def held_out_layouts(run: Path) -> list[tuple[str, int]]:
    """(task, seed) of every closed-loop episode the demo ran, in its order."""
    log = run / "eval.jsonl"
    records = read_records(log)
    if not records:
        raise SystemExit(f"bench_decoding: {log}: no closed-loop episodes (run the demo's eval stage first)")
    return [(r.task, r.seed) for r in records]


def max_episode_steps(run: Path, override: int | None) -> int:
    if override is not None:
        return override
    report = run / "report.json"
    if report.exists():
        return int(json.loads(report.read_text()).get("config", {}).get("max_episode_steps", 120))
    return 120


@dataclass(frozen=True)
class Decoding:
    """A beam width, and optionally the margin by which the beam's value must beat greedy's to be acted on."""

    width: int
    margin: float | None = None

    @property
    def label(self) -> str:
        return str(self.width) if self.margin is None else f"{self.width}, margin {self.margin:g}"

    @property
    def file_stem(self) -> str:
        return f"beam{self.width}" if self.margin is None else f"beam{self.width}_margin{self.margin:g}"


def roll_out(run: Path, policy_name: str, decoding: Decoding, steps: int, force: bool) -> list[EpisodeRecord]:
    """The run's checkpoint on its held-out layouts with one decoding (cached per run, policy and decoding)."""
    from tqdm import tqdm

    from q_transformer_ros.core.policy import QTransformerPolicy
    from q_transformer_ros.sim.agent_env import MetaWorldEnvironment, run_policy_episode

    layouts = held_out_layouts(run)
    log = run / "decoding" / f"{policy_name}_{decoding.file_stem}.jsonl"
    cached = [] if force else read_records(log)
    if [(r.task, r.seed) for r in cached] == layouts:
        return cached
    ckpt = run / CHECKPOINT_DIRS[policy_name] / "checkpoint.pt"
    if not ckpt.exists():
        raise SystemExit(f"bench_decoding: no checkpoint at {ckpt}")
    policy = QTransformerPolicy.from_checkpoint(ckpt, device="cpu")
    envs: dict[str, MetaWorldEnvironment] = {}
    records: list[EpisodeRecord] = []
    bar = tqdm(layouts, desc=f"{run.name} {policy_name} beam {decoding.label}", unit="ep", dynamic_ncols=True)
    try:
        for task, seed in bar:
            if task not in envs:
                envs[task] = MetaWorldEnvironment(policy.contract, [task], max_episode_steps=steps)
            env = envs[task]
            ep = run_policy_episode(policy, env, seed, beam_width=decoding.width, beam_margin=decoding.margin)
            records.append(EpisodeRecord(task=task, seed=seed, success=ep.success, steps=ep.steps, values=ep.values,
                                         source=f"{policy_name} beam {decoding.label}"))
            bar.set_postfix(success=f"{sum(r.success for r in records)}/{len(records)}")
    finally:
        bar.close()
        for env in envs.values():
            env.close()
    write_records(log, records)
    return records


def within_task_auroc(records: Sequence[EpisodeRecord], window: int | None) -> float:
    """Mean over tasks (with both outcomes) of the AUROC of the episodes' value within that task."""
    per_task = [value_auroc([r.early_value(window) for r in records if r.task == t],
                            [r.success for r in records if r.task == t])
                for t in dict.fromkeys(r.task for r in records)]
    per_task = [a for a in per_task if not math.isnan(a)]
    return float(np.mean(per_task)) if per_task else math.nan


def aurocs(records: Sequence[EpisodeRecord], window: int) -> tuple[float, float, float]:
    """(AUROC over all episodes, mean within-task AUROC, AUROC of whole-episode means) of one run's
    episodes, the first two of each episode's value over its first ``window`` decisions."""
    successes = [r.success for r in records]
    return (value_auroc([r.early_value(window) for r in records], successes), within_task_auroc(records, window),
            value_auroc([r.mean_value for r in records], successes))


def table_row(name: str, width: str, successes: int, episodes: int, auroc: float, within: float, whole: float) -> str:
    lo, hi = wilson_interval(successes, episodes)
    fmt = lambda x: "-" if math.isnan(x) else f"{x:.3f}"  # noqa: E731
    return (f"| {name} | {width} | {successes}/{episodes} ({100 * successes / episodes:.0f} % "
            f"[{100 * lo:.0f}-{100 * hi:.0f}]) | {fmt(auroc)} | {fmt(within)} | {fmt(whole)} |")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[tuple[str, Decoding], list[EpisodeRecord]] = {}
    windows: dict[str, int] = {}
    for run in args.runs:
        steps = max_episode_steps(run, args.max_episode_steps)
        windows[run.name] = value_window(steps)
        for decoding in args.decodings:
            results[run.name, decoding] = roll_out(run, args.policy, decoding, steps, args.force)
    lines = [f"bench_decoding: {args.policy} checkpoints of {len(args.runs)} demo run(s), ROS-free, on each run's "
             "held-out layouts; value AUROC (success vs failure) of each episode's mean predicted value over the "
             f"first half of its step budget ({', '.join(sorted({str(w) for w in windows.values()}))} decisions), "
             "and of whole-episode means", "",
             "| run | beam width | success [Wilson 95 %] | value AUROC | within-task AUROC (mean) | AUROC, whole episodes |",
             "|---|---|---|---|---|---|"]
    for run in args.runs:
        for decoding in args.decodings:
            recs = results[run.name, decoding]
            lines.append(table_row(run.name, decoding.label, sum(r.success for r in recs), len(recs),
                                   *aurocs(recs, windows[run.name])))
    if len(args.runs) > 1:  # successes pooled; AUROCs are per model, so their mean over runs
        for decoding in args.decodings:
            recs = [results[run.name, decoding] for run in args.runs]
            per_run = np.array([aurocs(r, windows[run.name]) for r, run in zip(recs, args.runs)], dtype=np.float64)
            lines.append(table_row(f"{len(args.runs)} runs (AUROC: mean of runs)", decoding.label,
                                   sum(r.success for rs in recs for r in rs), sum(len(rs) for rs in recs),
                                   *np.nanmean(per_run, axis=0)))
    data = [read_records(run / "record.jsonl") for run in args.runs]
    if all(data):
        rates = [f"{run.name} {100 * np.mean([r.success for r in d]):.0f} %" for run, d in zip(args.runs, data)]
        lines += ["", "the recorded data's success rate: " + ", ".join(rates)]
    text = "\n".join(lines)
    print("\n" + text)
    write_text_atomic(args.runs[0] / "decoding" / "results.md", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
