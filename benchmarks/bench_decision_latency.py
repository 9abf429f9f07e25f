"""Decision latency (p50/p99), ours vs the reference lucidrains/q-transformer 0.5.0, same run, same threads.

Rows per model size (``--configs``):
  reference full      ``QRoboticTransformer.get_optimal_actions`` on (1, 3, F, H, W): what the reference does
                      every control step (MaxViT over all F frames + history transformer + action head).
  ours full (act)     ``QTransformerPolicy.act({cam: (F, 3, H, W) uint8})``: the same full recomputation.
  ours streaming      ``push_frames({cam: (3, H, W)})`` + ``decide()``: one new frame through MaxViT, the
                      rest from the token cache; what our node pays per control step.
  ours decide only    ``decide()`` on a full token cache (history transformer + KV-cached head).
With ``--compile MODE`` the three rows of ours are measured again on a policy whose streaming steps are
compiled (``compile_mode``; ``act`` then runs the compiled steps one time step at a time); the compile
time (the policy's ``warmup``) is printed under the table. With ``--onnx`` they are measured again with
the streaming steps exported to ONNX and run by onnxruntime (``backend='onnxruntime'``; ``act`` stays on
torch); the export time is printed under the table. ``--repeats N`` measures every row of ours N times
(a fresh policy each time) and prints the median p50 with its range (min-max over the runs).
Ratios are ours p50 / reference p50 (targets, issue 6: streaming <= 1/6 on CPU; issue 2: full <= 1/3).

The reference runs in .venv-bench (``scripts/setup_bench_env.sh``) via ``reference_worker.py``; without that
venv (or with ``--no-reference``) only our rows are printed. Both sides use random weights (latency does
not depend on them) and no instruction (the reference with condition_on_text=False, ours with its learned
null embedding). Never asserts on time: it prints a table.

    .venv/bin/python benchmarks/bench_decision_latency.py                 # small + readme configs
    .venv/bin/python benchmarks/bench_decision_latency.py --quick         # smoke run (small config)
    .venv/bin/python benchmarks/bench_decision_latency.py --threads 1 --configs small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

# (warm-up, timed iterations) per config: the README config costs seconds per reference decision on CPU.
DEFAULT_ITERS = {"small": (3, 30), "readme": (1, 5)}
QUICK_ITERS = (1, 3)


def measure_ours(arch: common.BenchArch, warmup: int, iters: int, device: str, seed: int,
                 compile_mode: str = "off", onnx_dir: Path | None = None) -> dict[str, Any]:
    import time

    import numpy as np
    import torch

    import _ours

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    policy = _ours.make_policy(arch, device=device, compile_mode=compile_mode)
    cam = policy.camera_names[0]
    video = _ours.random_frames(arch, arch.frames, rng)
    stream = _ours.random_frames(arch, arch.frames + 8, rng)
    out: dict[str, Any] = dict(params=common.count_params(policy.net))
    if onnx_dir is not None:  # export (timed), then run the streaming steps in onnxruntime
        t0 = time.perf_counter()
        policy.use_onnx(onnx_dir / f"{arch.name}.pt", reexport=True)
        out["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy.warmup()  # what the node does at start; compiles the steps when compile_mode is set
    out["warmup_s"] = time.perf_counter() - t0

    out["full"] = common.time_calls(lambda: policy.act({cam: video}), warmup, iters)

    policy.reset(None)
    for f in stream[: arch.frames]:
        policy.push_frames({cam: f})
    pos = [0]

    def streaming_step() -> None:
        policy.push_frames({cam: stream[pos[0] % len(stream)]})
        pos[0] += 1
        policy.decide()

    out["streaming"] = common.time_calls(streaming_step, warmup, iters)
    out["decide"] = common.time_calls(policy.decide, warmup, iters)

    # streaming must agree with full recomputation on the same frames (cheap sanity check, not timed)
    policy.reset(None)
    for f in video:
        policy.push_frames({cam: f})
    s, a = policy.decide(), policy.act({cam: video})
    out["streaming_matches_full"] = bool((s.bins == a.bins).all())
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: small config, 1 warm-up + 3 timed decisions")
    p.add_argument("--configs", default=None, help="comma list of %s (default: small,readme; --quick: small)" % sorted(common.ARCHS))
    p.add_argument("--threads", type=int, default=0, help="torch threads for both sides (0 = torch's default)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decisions before timing (default per config)")
    p.add_argument("--iters", type=int, default=None, help="timed decisions of ours (default per config)")
    p.add_argument("--reference-iters", type=int, default=None, help="timed reference decisions (default per config)")
    p.add_argument("--compile", default="off", metavar="MODE",
                   help="also measure ours with the streaming steps compiled in this torch.compile mode "
                        "(default, reduce-overhead, max-autotune, ...; 'off' = eager only)")
    p.add_argument("--onnx", action="store_true", help="also measure ours with the streaming steps in onnxruntime")
    p.add_argument("--repeats", type=int, default=1, help="runs of each row of ours (median p50 and its range)")
    p.add_argument("--device", default="cpu", help="device for ours ('cpu', 'cuda'); the reference runs on CPU")
    p.add_argument("--no-reference", action="store_true", help="skip the reference even if .venv-bench exists")
    p.add_argument("--no-ours", action="store_true", help="only the reference (e.g. before our core exists)")
    p.add_argument("--reference-python", default=None, help=f"bench venv python (default {common.DEFAULT_REFERENCE_PYTHON})")
    p.add_argument("--reference-timeout", type=float, default=3600.0, help="seconds per reference worker run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write all numbers to this JSON file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    archs = common.parse_configs(args.configs or ("small" if args.quick else "small,readme"))
    threads = common.pin_threads(args.threads) if args.threads > 0 else common.default_threads()
    common.print_header("decision latency: ours vs reference q-transformer 0.5.0", argv, threads)

    ref_py, ours_reason = common.resolve_sides(args)

    rows, results, notes = [], {}, []
    for arch in archs:
        warm, iters = QUICK_ITERS if args.quick else DEFAULT_ITERS.get(arch.name, (2, 10))
        warm = args.warmup if args.warmup is not None else warm
        ours_iters = args.iters if args.iters is not None else iters
        ref_iters = args.reference_iters if args.reference_iters is not None else iters
        label = f"{arch.name} ({arch.frames}x{arch.image_size}², {arch.num_actions}x{arch.action_bins})"
        res: dict[str, Any] = {}
        ref_stats = None
        if ref_py is not None:
            try:
                ref = common.run_reference_worker(
                    ref_py, ["latency", "--config", arch.name, "--warmup", str(warm), "--iters", str(ref_iters),
                             "--seed", str(args.seed)], threads, timeout_s=args.reference_timeout)
                ref_stats = common.TimingStats.from_dict(ref["stats"])
                res["reference"] = ref
                rows.append([label, "reference full (get_optimal_actions)", ref["params"] / 1e6, ref_stats.n,
                             ref_stats.p50_ms, "-", ref_stats.p99_ms, ref_stats.cpu_p50_ms, 1.0])
            except common.ReferenceUnavailable as e:
                print(f"reference: {e}")
        modes = ["off"] + ([args.compile] if args.compile != "off" else []) + (["onnxruntime"] if args.onnx else [])
        for mode in modes if not ours_reason else []:
            import tempfile

            runs = []
            for _ in range(max(1, args.repeats)):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(measure_ours(arch, warm, ours_iters, args.device, args.seed,
                                             compile_mode=mode if mode != "onnxruntime" else "off",
                                             onnx_dir=Path(tmp) if mode == "onnxruntime" else None))
            ours = runs[0]
            res["ours" if mode == "off" else f"ours_{mode}"] = [
                {k: (v.to_dict() if isinstance(v, common.TimingStats) else v) for k, v in r.items()} for r in runs]
            tag = {"off": "", "onnxruntime": ", onnxruntime"}.get(mode, f", compiled '{mode}'")
            for key, name in (("full", "ours full (act)"), ("streaming", "ours streaming (push_frames+decide)"),
                              ("decide", "ours decide only (cached tokens)")):
                p50s = sorted(r[key].p50_ms for r in runs)
                med = p50s[len(p50s) // 2] if len(p50s) % 2 else 0.5 * (p50s[len(p50s) // 2 - 1] + p50s[len(p50s) // 2])
                st: common.TimingStats = min(runs, key=lambda r: abs(r[key].p50_ms - med))[key]
                spread = f"{p50s[0]:.2f}-{p50s[-1]:.2f}" if len(runs) > 1 else "-"
                rows.append([label, name.replace(")", f"{tag})", 1) if tag else name, ours["params"] / 1e6, st.n,
                             med, spread, st.p99_ms, st.cpu_p50_ms, common.ratio(med, ref_stats.p50_ms if ref_stats else None)])
            if mode == "onnxruntime":
                exports = sorted(r["export_s"] for r in runs)
                notes.append(f"{arch.name}: ONNX export of the steps took {exports[len(exports) // 2]:.1f} s "
                             f"(range {exports[0]:.1f}-{exports[-1]:.1f}), then warm-up "
                             f"{sorted(r['warmup_s'] for r in runs)[len(runs) // 2]:.2f} s")
            elif mode != "off":
                notes.append(f"{arch.name}: warm-up with compile mode '{mode}' (compiles both steps) took {ours['warmup_s']:.1f} s")
            if not all(r["streaming_matches_full"] for r in runs):
                print(f"WARNING: {arch.name}{tag}: streaming bins differ from full recomputation on the same frames")
        results[arch.name] = res

    print()
    common.print_table(["config", "path", "params M", "n", "p50 ms", "p50 range", "p99 ms", "cpu p50 ms",
                        "p50 / reference"], rows, digits=2)
    print("\nratio = ours p50 / reference p50 (targets: streaming <= 0.17, full <= 0.33). cpu p50 = process CPU "
          "time per decision (all threads), less sensitive to other load on the machine than wall time.")
    for note in notes:
        print(note)
    common.write_json(args.json_out, dict(threads=threads, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
