"""Training samples/s, ours vs the reference lucidrains/q-transformer 0.5.0 QLearner, same model size, same
data, same threads, same run.

Data: ``--episodes`` x ``--episode-len`` steps of random frames and actions of the config's shape, written
by each side's own tools: the reference ``Agent`` (MockEnvironment, random exploration) into its
``ReplayMemoryDataset`` memmaps (float32 frame stacks), ours by ``ReplayWriter`` (uint8 frames) read by
``ReplayDataset.get_batch``. A step on both sides = load a batch from disk + forward(s) + backward +
optimizer + target EMA. The reference QLearner's text-free path needs a small runtime patch (see
``reference_worker.py``: ``q_learner.pack_one`` passes None through); the installed package is not edited.
Ratio = ours samples/s / reference samples/s (target, issue 6: >= 2 on CPU). Never asserts on time.

    .venv/bin/python benchmarks/bench_training.py                      # small config
    .venv/bin/python benchmarks/bench_training.py --configs small,readme
    .venv/bin/python benchmarks/bench_training.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# per config: batch size, warm-up steps, timed steps, episodes, steps per episode
DEFAULTS = {"small": (16, 1, 5, 8, 16), "readme": (2, 1, 2, 2, 4)}
QUICK = (4, 1, 2, 2, 6)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small config, batch 4, 2 timed steps")
    p.add_argument("--configs", default=None, help="comma list of %s (default: small)" % sorted(common.ARCHS))
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0 = torch's default)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per side")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--episode-len", type=int, default=None)
    p.add_argument("--device", default="cpu", help="device for ours ('cpu', 'cuda'); the reference runs on CPU")
    p.add_argument("--workdir", default=None, help="where the temporary datasets go (default: system temp)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-ours", action="store_true")
    p.add_argument("--reference-python", default=None, help=f"bench venv python (default {common.DEFAULT_REFERENCE_PYTHON})")
    p.add_argument("--reference-timeout", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    archs = common.parse_configs(args.configs or "small")
    threads = common.pin_threads(args.threads) if args.threads > 0 else common.default_threads()
    common.print_header("training samples/s: ours vs reference q-transformer 0.5.0 QLearner", argv, threads)

    ref_py, ours_reason = common.resolve_sides(args)

    rows, results = [], {}
    for arch in archs:
        batch, warm, steps, episodes, ep_len = QUICK if args.quick else DEFAULTS.get(arch.name, (4, 1, 3, 2, 8))
        batch = args.batch_size or batch
        warm = args.warmup_steps if args.warmup_steps is not None else warm
        steps = args.steps or steps
        episodes = args.episodes or episodes
        ep_len = args.episode_len or ep_len
        label = f"{arch.name} ({arch.frames}x{arch.image_size}², {arch.num_actions}x{arch.action_bins})"
        res: dict[str, Any] = dict(batch_size=batch, steps=steps, episodes=episodes, episode_len=ep_len)
        ref_sps = None
        if ref_py is not None:
            try:
                wa = ["--workdir", args.workdir] if args.workdir else []
                ref = common.run_reference_worker(
                    ref_py, ["train", "--config", arch.name, "--batch-size", str(batch), "--warmup-steps", str(warm),
                             "--steps", str(steps), "--episodes", str(episodes), "--episode-len", str(ep_len),
                             "--seed", str(args.seed), *wa], threads, timeout_s=args.reference_timeout)
                res["reference"] = ref
                ref_sps = ref["samples_per_s"]
                rows.append([label, "reference QLearner (patched text-free path)", ref["params"] / 1e6, batch,
                             steps, ref["step_s"], ref_sps, 1.0])
            except common.ReferenceUnavailable as e:
                print(f"reference: {e}")
        if not ours_reason:
            import _ours

            with tempfile.TemporaryDirectory(prefix="qt_ours_train_", dir=args.workdir) as tmp:
                folder = Path(tmp) / "dataset"
                _ours.write_dataset(arch, folder, episodes, ep_len, seed=args.seed)
                ours = _ours.measure_training(arch, folder, batch, warm, steps, seed=args.seed, device=args.device)
            res["ours"] = ours
            rows.append([label, "ours learning_step + AdamW + EMA", ours["params"] / 1e6, batch, steps,
                         ours["step_s"], ours["samples_per_s"], common.ratio(ours["samples_per_s"], ref_sps)])
        results[arch.name] = res

    print()
    common.print_table(["config", "trainer", "params M", "batch", "timed steps", "s / step", "samples/s",
                        "ours / reference"], rows, digits=2)
    print("\nratio = samples/s ours / reference (target >= 2 on CPU, >= 3 on GPU).")
    common.write_json(args.json_out, dict(threads=threads, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
