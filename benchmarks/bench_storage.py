"""Bytes on disk per stored step, ours vs the reference lucidrains/q-transformer 0.5.0, same steps.

The reference ``Agent`` stores, per step, the whole float32 frame stack the model sees
(3 x F x H x W x 4 bytes) plus int64 actions, a float32 reward and a bool done, in preallocated memmaps
(``ReplayMemoryDataset``'s format). We run it for ``--episodes`` x ``--episode-len`` steps in its
MockEnvironment (random exploration: the bytes do not depend on the actions) and sum its files. Ours:
``ReplayWriter`` writes the same number of steps (each camera frame once as uint8, history windows
assembled at sample time; float32 actions, rewards, flags, MC returns; a JSON manifest); we sum the
dataset folder. Without .venv-bench the reference row is the formula above, marked as such.
Ratio = reference bytes/step / ours bytes/step (target, issue 2: >= 20).

    .venv/bin/python benchmarks/bench_storage.py                 # small + readme geometries
    .venv/bin/python benchmarks/bench_storage.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def reference_formula_bytes_per_step(arch: common.BenchArch, text_dim: int | None = None) -> int:
    """What the reference Agent stores per step: float32 (3, F, H, W) state, int64 (N,) actions,
    float32 reward, bool done (+ float32 (text_dim,) text embedding when conditioning on text)."""
    state = 3 * arch.frames * arch.image_size * arch.image_size * 4
    return state + arch.num_actions * 8 + 4 + 1 + (text_dim * 4 if text_dim else 0)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small geometry, 2 episodes x 4 steps")
    p.add_argument("--configs", default=None, help="comma list of %s (default: small,readme)" % sorted(common.ARCHS))
    p.add_argument("--episodes", type=int, default=None, help="episodes per side (default 2)")
    p.add_argument("--episode-len", type=int, default=None, help="steps per episode (default 20)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (only for the printed header and the worker)")
    p.add_argument("--workdir", default=None, help="where the temporary datasets go (default: system temp)")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-ours", action="store_true")
    p.add_argument("--reference-python", default=None, help=f"bench venv python (default {common.DEFAULT_REFERENCE_PYTHON})")
    p.add_argument("--reference-timeout", type=float, default=1800.0)
    p.add_argument("--json-out", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    archs = common.parse_configs(args.configs or ("small" if args.quick else "small,readme"))
    episodes = args.episodes or 2
    ep_len = args.episode_len or (4 if args.quick else 20)
    steps = episodes * ep_len
    threads = common.pin_threads(args.threads) if args.threads > 0 else common.default_threads()
    common.print_header("bytes per stored step: ours vs reference q-transformer 0.5.0", argv, threads)

    ref_py, ours_reason = common.resolve_sides(args, "; the formula row is printed instead")

    rows, results = [], {}
    for arch in archs:
        label = f"{arch.name} ({arch.frames}x{arch.image_size}², {arch.num_actions} dims)"
        res: dict[str, Any] = dict(episodes=episodes, episode_len=ep_len, steps=steps)
        formula = reference_formula_bytes_per_step(arch)
        ref_bps = None
        if ref_py is not None:
            try:
                wa = ["--workdir", args.workdir] if args.workdir else []
                ref = common.run_reference_worker(
                    ref_py, ["storage", "--config", arch.name, "--episodes", str(episodes), "--episode-len", str(ep_len),
                             *wa], threads, timeout_s=args.reference_timeout)
                res["reference"] = ref
                ref_bps = ref["bytes_per_step"]
                rows.append([label, "reference Agent memmaps (measured)", steps, ref["total_bytes"], ref_bps,
                             ref["allocated_bytes_per_step"], 1.0])
            except common.ReferenceUnavailable as e:
                print(f"reference: {e}")
        if ref_bps is None:
            ref_bps = float(formula)
            rows.append([label, "reference Agent memmaps (formula)", steps, formula * steps, ref_bps, None, 1.0])
        res["reference_formula_bytes_per_step"] = formula
        if not ours_reason:
            import _ours

            with tempfile.TemporaryDirectory(prefix="qt_ours_storage_", dir=args.workdir) as tmp:
                info = _ours.write_dataset(arch, Path(tmp) / "dataset", episodes, ep_len)
            total = sum(info["files"].values())
            arrays = sum(v for k, v in info["files"].items() if k.endswith(".npy"))
            res["ours"] = dict(info, total_bytes=total, bytes_per_step=total / steps, array_bytes_per_step=arrays / steps)
            rows.append([label, "ours dataset folder (all files)", steps, total, total / steps,
                         sum(info["allocated"].values()) / steps, common.ratio(ref_bps, total / steps)])
            rows.append([label, "ours .npy arrays only (no manifest)", steps, arrays, arrays / steps, None,
                         common.ratio(ref_bps, arrays / steps)])
        results[arch.name] = res

    print()
    common.print_table(["geometry", "storage", "steps", "bytes", "bytes / step", "allocated / step",
                        "reference / ours"], rows, digits=1)
    print("\nratio = reference bytes/step / ours bytes/step (target >= 20). 'allocated' = disk blocks actually used. "
          "The manifest is a fixed cost per dataset/episode, amortised over more steps in real datasets.")
    common.write_json(args.json_out, dict(results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
