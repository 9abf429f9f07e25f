"""Does it learn? Q-Transformer vs behaviour cloning on the same mixed-quality Meta-World data.

    python benchmarks/bench_learning.py                                   # MT10, GPU if present
    python benchmarks/bench_learning.py --tasks drawer-close-v3 reach-v3 --episodes-per-task 10 \
        --train-steps 300 --eval-episodes 5 --out /tmp/bench_learning       # small CPU run
    python benchmarks/bench_learning.py --ablations no_conservative no_mc_bound

1. Data: the scripted expert + Gaussian noise (``--noise-levels``, one per episode in turn) on layout seeds
   0..N-1 of every task, ROS-free (``sim.MetaWorldEnvironment``; the demo records the same through ROS),
   written as one replay dataset. Cached: a rerun with the same knobs reuses it.
2. Training, same data, same network (``--model-preset``), same steps and seed: the Q-Transformer
   objective, behaviour cloning (trainer objective ``bc``), and optional ablations of the Q-Transformer
   (``no_conservative``: conservative weight 0; ``conservative_01``: weight 0.1; ``no_mc_bound``: no
   Monte-Carlo lower bound).
3. Closed loop, ROS-free (``QTransformerPolicy`` + the simulator) on held-out layout seeds.
4. Table: success per task for data / BC / QT (/ ablations), the predicted value on successes vs
   failures, and a reliability table of the Q-Transformer's value. Also written to ``<out>/results.md``.

Each trained model and each evaluation is cached under ``--out`` (``--force`` redoes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MUJOCO_GL", "egl")

# torchvision's C extension (pulled in by open_clip for the text encoder) segfaults when it is first
# loaded after MuJoCo/Meta-World (seen here with torch 2.x + mujoco 3.x): load the torch side first.
import open_clip  # noqa: E402,F401
import torch  # noqa: E402,F401
import torchvision.ops  # noqa: E402,F401

from q_transformer_ros.e2e.config import DemoConfig, default_contract_path  # noqa: E402
from q_transformer_ros.e2e.report import (  # noqa: E402
    EpisodeRecord, format_calibration, format_table, read_records, summarize, value_window, write_records,
    write_text_atomic,
)
from q_transformer_ros.sim.operators import OPERATOR_STYLES  # noqa: E402
from q_transformer_ros.sim.tasks import MT10_TASKS  # noqa: E402

EVAL_SEED_BASE = 100_000
"""Held-out layouts: far from the training seeds 0..N-1."""
VARIANTS = {
    "QT": ["--objective", "q_learning"],
    "BC": ["--objective", "bc"],
    "QT-no_conservative": ["--objective", "q_learning", "--set", "learner.conservative_weight=0"],
    "QT-conservative_01": ["--objective", "q_learning", "--set", "learner.conservative_weight=0.1"],
    "QT-no_mc_bound": ["--objective", "q_learning", "--set", "learner.mc_lower_bound=false"],
    "QT-td_bce": ["--objective", "q_learning", "--set", "learner.td_loss=bce"],
    "QT-n_step_5": ["--objective", "q_learning", "--n-step", "5"],
    "QT-hl_gauss": ["--objective", "q_learning", "--set", "learner.td_loss=hl_gauss",
                    "--set", "model_overrides.value_bins=51"],
    "QT-bc_aux": ["--objective", "q_learning", "--set", "learner.bc_weight=0.1"],
    "QT-gamma_995": ["--objective", "q_learning", "--set", "discount=0.995"],
    "BC-gamma_995": ["--objective", "bc", "--set", "discount=0.995"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(MT10_TASKS), help="Meta-World tasks (default: MT10)")
    p.add_argument("--episodes-per-task", type=int, default=20, help="recorded episodes per task")
    p.add_argument("--noise-levels", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0],
                   help="expert noise std per episode, in turn")
    p.add_argument("--operators", nargs="+", default=["expert"], choices=OPERATOR_STYLES,
                   help="operator style per episode, in turn (sim/operators.py: deliberate mistakes); e.g. "
                        "expert expert wrong_target stop_short near_miss")
    p.add_argument("--max-episode-steps", type=int, default=120)
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-preset", default="tiny", choices=("tiny", "small", "base"))
    p.add_argument("--eval-episodes", type=int, default=10, help="closed-loop episodes per task (held-out seeds)")
    p.add_argument("--ablations", nargs="*", default=[], choices=("no_conservative", "conservative_01", "no_mc_bound", "td_bce", "n_step_5", "hl_gauss", "bc_aux", "gamma_995"),
                   help="Q-Transformer variants next to QT: conservative weight 0, no MC lower bound, BCE instead "
                        "of MSE on the taken bin's Q, 5-step returns, HL-Gauss value classification (51 value bins), an auxiliary cloning term (weight 0.1), discount 0.995 instead of the contract's")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=TRAIN_ARGS",
                   help="an extra Q-Transformer variant: its trainer flags, e.g. --variant 'lr3=--set lr=1e-3' "
                        "(shown as QT-NAME; cached under that name, so give a changed definition a new name)")
    p.add_argument("--no-bc", action="store_true", help="train and evaluate the Q-Transformer variants only")
    p.add_argument("--beam-width", type=int, default=1,
                   help="action decoding in the closed loop, for every variant: 1 = greedy, k > 1 = beam search "
                        "(policy_node's beam_width; the demo's default is 8; QT's beam ranks by Q, BC's by "
                        "log-probability). "
                        "Trained models are reused: only the evaluation reruns")
    p.add_argument("--augment-shift-px", type=int, default=0,
                   help="DrQ random-shift augmentation in training, pixels (0 = off), for every variant")
    p.add_argument("--failures", choices=("terminal", "truncated"), default="terminal",
                   help="how episodes that end without success are stored: terminal (a failure verdict: value 0, "
                        "no bootstrap; what convert_bag stores for an episode that ends on a False success "
                        "message) or truncated (a time-limit cut that bootstraps; the old default)")
    p.add_argument("--keep-still-steps", type=int, default=None, metavar="K",
                   help="drop all but the first K steps of every stretch where the arm stands still and the command "
                        "repeats (replay.still_steps; what convert_bag --keep-still-steps does); default: keep all")
    p.add_argument("--camera-map", nargs="+", default=[], metavar="CAM:=MW_CAMERA",
                   help="contract camera -> Meta-World camera, e.g. front:=topview (sim_node's camera_map; default: "
                        "the camera of the same name, else corner)")
    p.add_argument("--contract", default=None, help="contract YAML (default config/contract_ee_arm.yaml)")
    p.add_argument("--image-size", type=int, default=None,
                   help="camera size (a multiple of 16); default: the contract's (64)")
    p.add_argument("--device", default="auto", help="torch device (auto: CUDA if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_out/learning", help="cache and results folder")
    p.add_argument("--force", action="store_true", help="recollect, retrain and re-evaluate")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# 1. data
# ---------------------------------------------------------------------------------------------

def camera_map(args: argparse.Namespace) -> dict[str, str]:
    """``--camera-map front:=topview ...`` as {contract camera: Meta-World camera}."""
    out = {}
    for item in args.camera_map:
        name, sep, mw = item.partition(":=")
        if not sep or not name or not mw:
            raise SystemExit(f"bench_learning: --camera-map {item!r}: give CAMERA:=METAWORLD_CAMERA, e.g. front:=topview")
        out[name] = mw
    return out


def collect(args: argparse.Namespace, contract, dataset: Path) -> list[EpisodeRecord]:
    """Expert + noise episodes of every task into a replay dataset; returns one record per episode."""
    from tqdm import tqdm

    from q_transformer_ros.replay.still_steps import keep_still_steps, still_steps
    from q_transformer_ros.replay.writer import EpisodeData, ReplayWriter
    from q_transformer_ros.sim.agent_env import MetaWorldEnvironment

    log = dataset.parent / "data_episodes.jsonl"
    key = json.dumps([args.tasks, args.episodes_per_task, args.noise_levels, args.max_episode_steps, contract.fingerprint(),
                      args.failures] + ([args.operators] if args.operators != ["expert"] else [])
                     + ([args.keep_still_steps] if args.keep_still_steps is not None else [])
                     + ([camera_map(args)] if args.camera_map else []))
    if (dataset / "manifest.json").exists() and (dataset.parent / "data_key.json").exists() \
            and (dataset.parent / "data_key.json").read_text() == key:
        return read_records(log)
    if dataset.exists():
        shutil.rmtree(dataset)
    if args.keep_still_steps is not None and not contract.state_dim:
        raise SystemExit(f"bench_learning: --keep-still-steps needs state inputs; contract '{contract.name}' has none")
    n = len(args.tasks)
    env = MetaWorldEnvironment(contract, args.tasks, max_episode_steps=args.max_episode_steps, noise_seed=args.seed,
                               camera_map=camera_map(args))
    records: list[EpisodeRecord] = []
    writer = ReplayWriter(dataset, contract, create_ok=True)
    bar = tqdm(total=n * args.episodes_per_task, desc="collect", unit="ep", dynamic_ncols=True)
    try:
        for k, task in enumerate(args.tasks):
            for i in range(args.episodes_per_task):
                seed = i * n + k  # MetaWorldEnvironment runs task seed % n
                style = args.operators[i % len(args.operators)]
                noise = args.noise_levels[(i // len(args.operators)) % len(args.noise_levels)]
                instruction, obs = env.reset(seed)
                seen, actions, success = [], [], False
                while True:
                    seen.append(obs)
                    action = env.expert_action(noise, style)
                    actions.append(action)
                    obs, _r, terminated, truncated, info = env.step(action)
                    success = bool(info["success"])
                    if terminated or truncated:
                        break
                if args.keep_still_steps is not None:
                    keep = keep_still_steps(still_steps(np.stack(actions), np.stack([o.state for o in seen]), contract),
                                            args.keep_still_steps)
                    kept = np.flatnonzero(keep)
                    seen, actions = [seen[t] for t in kept], [actions[t] for t in kept]
                writer.add_episode(EpisodeData.from_observations(
                    seen, actions,
                    success=success, terminal=success or args.failures == "terminal", instruction=instruction,
                    source_id=f"bench:{task}:seed{seed}:noise{noise:g}" + ("" if style == "expert" else f":{style}")))
                records.append(EpisodeRecord(task=task, seed=seed, success=success, steps=len(actions), noise=noise,
                                             source=style))
                bar.set_postfix(task=task, success=f"{sum(r.success for r in records)}/{len(records)}")
                bar.update(1)
    finally:
        bar.close()
        writer.close()
        env.close()
    write_records(log, records)
    write_text_atomic(dataset.parent / "data_key.json", key)
    return records


# ---------------------------------------------------------------------------------------------
# 2. training, 3. closed loop
# ---------------------------------------------------------------------------------------------

def train_variant(args: argparse.Namespace, name: str, dataset: Path, out: Path) -> Path:
    from q_transformer_ros.core.trainer import main as train_main

    ckpt = out / "checkpoint.pt"
    done = out / "done.json"
    if done.exists() and ckpt.exists():
        return ckpt
    argv = ["--dataset", str(dataset), "--out", str(out), "--steps", str(args.train_steps),
            "--batch-size", str(args.batch_size), "--model-preset", args.model_preset, "--device", args.device,
            "--seed", str(args.seed), "--checkpoint-every", str(max(100, args.train_steps // 5)),
            "--set", f"warmup_steps={min(200, max(1, args.train_steps // 10))}",
            "--set", "text_encoder.text_overrides={width: 128, layers: 2, heads: 2}",
            "--set", f"augment_shift_px={args.augment_shift_px}", *VARIANTS[name]]
    t0 = time.monotonic()
    if train_main(argv) != 0:
        raise SystemExit(f"bench_learning: training {name} failed (see above); output {out}")
    write_text_atomic(done, json.dumps({"seconds": time.monotonic() - t0}))
    return ckpt


def evaluate(args: argparse.Namespace, name: str, ckpt: Path, contract, out: Path) -> list[EpisodeRecord]:
    """Closed loop on held-out seeds, ROS-free: policy.decide() -> env.step()."""
    from tqdm import tqdm

    from q_transformer_ros.core.policy import QTransformerPolicy
    from q_transformer_ros.sim.agent_env import MetaWorldEnvironment, run_policy_episode

    beam = args.beam_width  # the policy ranks a cloning checkpoint's beam by log-probability, QT's by Q
    log = out / ("eval.jsonl" if beam == 1 else f"eval_beam{beam}.jsonl")
    if log.exists():
        recs = read_records(log)
        if len(recs) == len(args.tasks) * args.eval_episodes:
            return recs
    policy = QTransformerPolicy.from_checkpoint(ckpt, device=args.device)
    n = len(args.tasks)
    env = MetaWorldEnvironment(contract, args.tasks, max_episode_steps=args.max_episode_steps,
                               camera_map=camera_map(args))
    records: list[EpisodeRecord] = []
    bar = tqdm(total=n * args.eval_episodes, desc=f"eval {name}", unit="ep", dynamic_ncols=True)
    try:
        for k, task in enumerate(args.tasks):
            for j in range(args.eval_episodes):
                seed = EVAL_SEED_BASE * n + j * n + k
                ep = run_policy_episode(policy, env, seed, beam_width=beam)
                records.append(EpisodeRecord(task=task, seed=seed, success=ep.success, steps=ep.steps, values=ep.values,
                                             source=name))
                bar.set_postfix(task=task, success=f"{sum(r.success for r in records)}/{len(records)}")
                bar.update(1)
    finally:
        bar.close()
        env.close()
    write_records(log, records)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.beam_width < 1:
        raise SystemExit(f"bench_learning: --beam-width {args.beam_width}: must be >= 1 (1 = greedy)")
    from q_transformer_ros.contract import load_contract

    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip() or f"QT-{name}" in VARIANTS:
            raise SystemExit(f"bench_learning: --variant {spec!r}: give NAME=TRAIN_ARGS with a new NAME")
        VARIANTS[f"QT-{name}"] = ["--objective", "q_learning", *shlex.split(flags)]
    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    contract_path = Path(args.contract) if args.contract else default_contract_path()
    if args.image_size:  # the same derived contract the demo writes
        contract_path = DemoConfig(out=out, contract=contract_path, image_size=args.image_size).run_contract()
    contract = load_contract(contract_path)
    key = json.dumps({k: v for k, v in vars(args).items()
                      if k not in ("force", "eval_episodes", "ablations", "variant", "out", "no_bc", "beam_width")
                      and not (k == "operators" and v == ["expert"])})
    if (out / "run_key.json").exists() and (out / "run_key.json").read_text() != key:
        for variant in VARIANTS:  # other knobs: models and evaluations are stale (the data cache checks itself)
            shutil.rmtree(out / variant, ignore_errors=True)
    write_text_atomic(out / "run_key.json", key)

    timings: dict[str, float] = {}
    t0 = time.monotonic()
    data = collect(args, contract, out / "dataset")
    timings["collect"] = time.monotonic() - t0
    names = ["QT"] + ([] if args.no_bc else ["BC"]) + [f"QT-{a}" for a in args.ablations]
    names += [f"QT-{spec.partition('=')[0]}" for spec in args.variant]
    evals: dict[str, list[EpisodeRecord]] = {}
    for name in names:
        t0 = time.monotonic()
        ckpt = train_variant(args, name, out / "dataset", out / name)
        timings[f"train {name}"] = time.monotonic() - t0
        t0 = time.monotonic()
        evals[name] = evaluate(args, name, ckpt, contract, out / name)
        timings[f"eval {name}"] = time.monotonic() - t0

    window = value_window(args.max_episode_steps)
    rows = summarize(data, evals, args.tasks, window)
    table = format_table(rows)
    calib = {n: format_calibration(evals[n], window) for n in names if n != "BC"}
    header = (f"bench_learning: {len(args.tasks)} tasks, {args.episodes_per_task} episodes/task (noise "
              f"{', '.join(f'{x:g}' for x in args.noise_levels)}), {args.train_steps} steps x batch {args.batch_size} "
              f"({args.model_preset}), {args.eval_episodes} held-out closed-loop episodes/task, device {args.device}"
              + (f", decoded with beam width {args.beam_width} (QT by Q, BC by log-probability)" if args.beam_width > 1 else ""))
    text = [header, "", table, ""]
    text.append(f"V|success / V|failure: the Q-Transformer's mean predicted value (each episode's first {window} "
                "steps) on closed-loop successes / failures; BC's 'value' is an action probability, not a success "
                "estimate.")
    for n, c in calib.items():
        text += ["", f"calibration of {n}'s predicted value:", c]
    text += ["", "wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    print("\n".join(text))
    write_text_atomic(out / "results.md", "```\n" + "\n".join(text) + "\n```\n")
    print(f"\nbench_learning: results in {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
