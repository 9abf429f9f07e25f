"""``demo``: the whole product end to end, on one machine, in about 15 minutes on 2 CPU cores.

1. record   the scripted Meta-World expert (+ Gaussian noise: expert, noisy and failed episodes) drives
            ``sim_node`` through ROS topics; the recorder writes one rosbag2 MCAP per episode;
2. convert  the bags -> a replay dataset (``convert_bag``);
3. train    a small Q-Transformer on CPU (``train``);
4. eval     ``policy_node`` with the trained checkpoint drives ``sim_node`` on held-out seeds;
5. report   data vs closed-loop success, predicted value on successes vs failures, plots, a GIF.

Every stage is skipped when its output exists and its inputs did not change (``--force`` redoes);
recording and the closed loop also resume per episode, training from its last checkpoint.

    python -m q_transformer_ros.demo                      # the full demo into ./demo_out
    python -m q_transformer_ros.demo --quick --out /tmp/q # a tiny smoke run (about a minute)
    python -m q_transformer_ros.demo --stages train eval report --force train --train-steps 3000
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Sequence

from q_transformer_ros.e2e.config import STAGES, DemoConfig
from q_transformer_ros.sim.operators import OPERATOR_STYLES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for tests: 1 task, 2 short episodes, a few training steps, 1 closed-loop episode")
    p.add_argument("--tasks", nargs="+", help="Meta-World tasks (default: drawer-open-v3 button-press-topdown-v3 drawer-close-v3)")
    p.add_argument("--episodes-per-task", type=int, help="recorded episodes per task")
    p.add_argument("--noise-levels", type=float, nargs="+", help="expert noise std per episode, in turn")
    p.add_argument("--operators", nargs="+", choices=OPERATOR_STYLES,
                   help="operator style per episode, in turn: the expert or a deliberate mistake (sim/operators.py)")
    p.add_argument("--keep-still-steps", type=int, metavar="K",
                   help="the converter keeps the first K steps of every stretch where the arm stands still and the "
                        "command repeats (default 2; a negative K keeps every step)")
    p.add_argument("--max-episode-steps", type=int, help="control steps per episode before it counts as failed")
    p.add_argument("--train-steps", type=int, help="optimizer steps of training")
    p.add_argument("--batch-size", type=int, help="training batch size")
    p.add_argument("--model-preset", choices=("tiny", "small", "base"), help="network size")
    p.add_argument("--objective", choices=("q_learning", "bc"), help="q_learning (Q-Transformer) or bc")
    p.add_argument("--conservative-weight", type=float,
                   help="weight of the Q-Transformer's conservative term (default 1, the paper's)")
    p.add_argument("--text-encoder-weights", help="local open_clip weights file for the instruction encoder")
    p.add_argument("--eval-episodes", type=int, help="closed-loop episodes per task (held-out seeds)")
    p.add_argument("--beam-width", type=int,
                   help="action decoding of both closed loops: 1 = greedy, k > 1 = beam search (default 8; the "
                        "Q-Transformer's beam ranks by Q, cloning's by log-probability)")
    p.add_argument("--beam-margin", type=float,
                   help="with beam width > 1, the Q-Transformer acts on the beam's action only when its value beats "
                        "the greedy action's by more than this (default 0.05; -1 = always the beam's)")
    p.add_argument("--no-bc", action="store_true", help="do not train and run the behaviour-cloning baseline")
    p.add_argument("--contract", help="robot contract YAML (default: config/contract_ee_arm.yaml)")
    p.add_argument("--image-size", type=int, help="camera size for the run (default 32; 0 = the contract's own)")
    p.add_argument("--domain-id", type=int, help="ROS_DOMAIN_ID for all nodes (default: 100 + pid %% 100)")
    p.add_argument("--device", help="torch device for training and the policy node (default: cpu)")
    p.add_argument("--torch-threads", type=int,
                   help="torch threads for training (default 0: one per core not busy with other processes)")
    p.add_argument("--stages", nargs="+", choices=STAGES, help="run only these stages (default: all)")
    p.add_argument("--force", nargs="*", choices=STAGES, metavar="STAGE",
                   help="redo these stages (no name: all) even if their output exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--wall-clock", action="store_true",
                   help="run the sim at the control rate in wall-clock time (default: sim time, /clock from sim_node, "
                        "every step as soon as its command arrives)")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for the trainer, e.g. --train-arg=--set --train-arg=learner.conservative_weight=0")
    return p


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    fields = {
        "out": args.out, "tasks": args.tasks, "episodes_per_task": args.episodes_per_task,
        "noise_levels": args.noise_levels, "operators": args.operators, "max_episode_steps": args.max_episode_steps,
        "train_steps": args.train_steps, "batch_size": args.batch_size, "model_preset": args.model_preset,
        "objective": args.objective, "text_encoder_weights": args.text_encoder_weights,
        "conservative_weight": args.conservative_weight,
        "eval_episodes": args.eval_episodes, "beam_width": args.beam_width,
        "beam_margin": args.beam_margin, "contract": args.contract,
        "domain_id": args.domain_id,
        "device": args.device, "extra_train_args": args.train_arg or None, "torch_threads": args.torch_threads,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    if args.keep_still_steps is not None:
        given["keep_still_steps"] = args.keep_still_steps if args.keep_still_steps >= 0 else None
    if args.image_size is not None:
        given["image_size"] = args.image_size or None
    given["progress"] = not args.no_progress
    if args.no_bc:
        given["compare_bc"] = False
    if args.wall_clock:
        given["sim_time"] = False
    return DemoConfig.quick(**given) if args.quick else DemoConfig(**given)


def run(cfg: DemoConfig, stages: Sequence[str] = STAGES, force: Sequence[str] = ()) -> dict[str, float]:
    """Run the selected stages in order; returns wall seconds per stage run (skipped stages: absent)."""
    from q_transformer_ros.e2e import stages as st  # noqa: PLC0415

    cfg.out.mkdir(parents=True, exist_ok=True)
    cfg.contract = cfg.run_contract()
    for stage in force:
        st.clear_stage(cfg, stage)
    timings: dict[str, float] = {}
    total0 = time.monotonic()
    for i, stage in enumerate(STAGES, 1):
        if stage not in stages:
            continue
        key = st.stage_key(cfg, stage)
        marker = st.read_marker(cfg, stage)
        if stage != "report" and marker is not None and marker.get("key") == key:
            st._say(f"stage {i}/{len(STAGES)} {stage}: done before ({marker.get('seconds')} s), skipped "
                    f"(--force {stage} to redo)")
            continue
        if stage == "record" and marker is not None and any(
                marker.get("key", {}).get(k) != key[k] for k in ("max_episode_steps", "contract")):
            st._say("stage 1 record: episode length or contract changed: recording from scratch")
            st.clear_stage(cfg, stage)
        if marker is not None and stage in ("convert", "train", "eval"):
            st._say(f"stage {i}/{len(STAGES)} {stage}: inputs changed since the last run: redoing it")
            if stage == "eval":
                st.clear_stage(cfg, stage)  # episodes of an older checkpoint do not count
            if stage == "train":
                st.clear_stage(cfg, stage)
        if stage == "train":
            st.clear_stage(cfg, "eval")  # closed-loop episodes of an older checkpoint must not be resumed
        st._say(f"stage {i}/{len(STAGES)} {stage} ...")
        t0 = time.monotonic()
        info = st.STAGE_FUNCTIONS[stage](cfg)
        timings[stage] = time.monotonic() - t0
        if stage != "report":
            st.write_marker(cfg, stage, key, timings[stage], info)
        st._say(f"stage {stage} took {timings[stage]:.0f} s")
    st._say(f"finished in {time.monotonic() - total0:.0f} s; outputs in {cfg.out.resolve()}")
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """The ``demo`` executable; 0 on success, 1 when a stage fails, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    force = STAGES if args.force == [] else tuple(args.force or ())
    try:
        run(cfg, tuple(args.stages or STAGES), force)
    except KeyboardInterrupt:
        print(f"\ndemo: interrupted; rerun the same command to resume (outputs in {cfg.out})", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line per failure, the traceback only in the stage's log
        from q_transformer_ros.e2e.stages import StageError  # noqa: PLC0415

        kind = "" if isinstance(e, StageError) else f"{type(e).__name__}: "
        if not isinstance(e, (StageError, RuntimeError, TimeoutError)):
            traceback.print_exc()  # an unexpected error type is a bug: show where
        print(f"demo: error: {kind}{e}\ndemo: fix it and rerun the same command: finished stages are kept "
              f"(outputs in {cfg.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
