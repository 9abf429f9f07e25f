"""Measure the reference lucidrains/q-transformer 0.5.0. Runs INSIDE .venv-bench (scripts/setup_bench_env.sh).

Our benchmark scripts start this file as a subprocess with the same torch thread count and read the one
JSON object it prints on its last stdout line (everything else goes to stderr). It imports only the
reference package, torch, numpy and ``common.py`` (which needs nothing of ours).

Modes:
  latency  -- decision latency of ``QRoboticTransformer.get_optimal_actions`` (the full decision: MaxViT over
              all F frames, history transformer, autoregressive head), batch 1, eval mode.
  train    -- training samples/s of the reference ``QLearner`` on replay memories written by the reference
              ``Agent`` (MockEnvironment, random exploration) and read by its ``ReplayMemoryDataset``.
  storage  -- bytes on disk per stored step of the reference ``Agent``'s replay memories.

Conditioning: condition_on_text=False everywhere, because the reference's text path downloads T5 from a
model hub (unreachable here).

Runtime patch (training only; applied in memory, the installed package is never edited):
  ``q_transformer.q_learner.pack_one`` is wrapped so that ``pack_one(None, pattern)`` returns
  ``(None, None)``. Why: ``QLearner.autoregressive_q_learn`` always does
  ``text_embeds, _ = pack_one(text_embeds, '* d')``, and einops cannot pack ``None``, so the text-free
  path (condition_on_text=False, where the dataset yields ``text_embeds=None``) crashes before the model
  is called. Passing ``None`` through is exactly what the model then expects (it asserts that no text is
  given when condition_on_text=False). Nothing else of the learning step is changed.
  Also (configuration, not a patch): ``ReplayMemoryDataset`` yields ``None`` text embeddings, which torch's
  default collate rejects, so the DataLoader gets a ``collate_fn`` (through QLearner's public
  ``dataloader_kwargs``) that keeps ``None`` fields as ``None``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py: stdlib + torch only)


def _quiet() -> None:
    warnings.filterwarnings("ignore")


def build_model(arch: common.BenchArch) -> Any:
    from q_transformer import QRoboticTransformer

    return QRoboticTransformer(**arch.reference_kwargs())


# ---------------------------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------------------------

def measure_latency(arch: common.BenchArch, warmup: int, iters: int, seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    model = build_model(arch).eval()
    video = torch.rand(1, 3, arch.frames, arch.image_size, arch.image_size)  # (b c f h w) in [0, 1]
    bins_seen: list[list[int]] = []

    def decide() -> None:
        bins = model.get_optimal_actions(video)
        bins_seen.append(bins[0].tolist())

    stats = common.time_calls(decide, warmup, iters)
    if len(bins_seen[-1]) != arch.num_actions:
        raise RuntimeError(f"reference returned {len(bins_seen[-1])} action bins, expected {arch.num_actions}")
    return dict(mode="latency", config=arch.name, params=common.count_params(model), stats=stats.to_dict(),
                last_bins=bins_seen[-1])


# ---------------------------------------------------------------------------------------------
# replay memories written by the reference Agent
# ---------------------------------------------------------------------------------------------

def write_memories(arch: common.BenchArch, folder: Path, episodes: int, steps: int, model: Any = None) -> dict[str, Any]:
    """Run the reference Agent in its MockEnvironment for ``episodes`` x ``steps`` steps.

    Exploration is fully random (epsilon 1): the stored bytes do not depend on which action was taken,
    and it keeps data collection from costing one full model forward per step."""
    from q_transformer.agent import Agent
    from q_transformer.mocks import MockEnvironment

    model = model if model is not None else build_model(arch)
    env = MockEnvironment(state_shape=(3, arch.frames, arch.image_size, arch.image_size), text_embed_shape=(768,))
    agent = Agent(model, environment=env, memories_dataset_folder=str(folder), num_episodes=episodes,
                  max_num_steps_per_episode=steps, epsilon_start=1.0, epsilon_end=1.0, num_steps_to_target_epsilon=1)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        agent()
    elapsed = time.perf_counter() - t0
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    allocated = {p.name: p.stat().st_blocks * 512 for p in sorted(folder.iterdir()) if p.is_file()}
    return dict(files=files, allocated=allocated, write_s=elapsed)


def measure_storage(arch: common.BenchArch, episodes: int, steps: int, workdir: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qt_ref_storage_", dir=workdir) as tmp:
        info = write_memories(arch, Path(tmp) / "replay_memories", episodes, steps)
    n = episodes * steps
    total = sum(info["files"].values())
    return dict(mode="storage", config=arch.name, episodes=episodes, steps_per_episode=steps, steps=n,
                files=info["files"], allocated=info["allocated"], total_bytes=total,
                bytes_per_step=total / n, allocated_bytes_per_step=sum(info["allocated"].values()) / n,
                write_s=info["write_s"])


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def patch_text_free_path() -> None:
    """See the module docstring: let ``pack_one(None, ...)`` pass through in q_transformer.q_learner."""
    import q_transformer.q_learner as ql

    if getattr(ql.pack_one, "_bench_patched", False):
        return
    original = ql.pack_one

    def pack_one(t: Any, pattern: str) -> Any:
        if t is None:
            return None, None
        return original(t, pattern)

    pack_one._bench_patched = True  # type: ignore[attr-defined]
    ql.pack_one = pack_one


def collate_keep_none(batch: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Default collate per field, but a field that is None in every sample stays None."""
    from torch.utils.data import default_collate

    fields = list(zip(*batch))
    return tuple(None if all(x is None for x in f) else default_collate(list(f)) for f in fields)


def measure_training(arch: common.BenchArch, batch_size: int, warmup_steps: int, steps: int, episodes: int,
                     episode_len: int, workdir: str | None, seed: int) -> dict[str, Any]:
    import torch
    from q_transformer import QLearner, ReplayMemoryDataset

    patch_text_free_path()
    torch.manual_seed(seed)
    model = build_model(arch)
    with tempfile.TemporaryDirectory(prefix="qt_ref_train_", dir=workdir) as tmp:
        folder = Path(tmp) / "replay_memories"
        mem = write_memories(arch, folder, episodes, episode_len, model=model)
        dataset = ReplayMemoryDataset(str(folder), num_timesteps=1, condition_on_text=False)
        with contextlib.redirect_stdout(sys.stderr):
            learner = QLearner(
                model, dataset=dataset, batch_size=batch_size, num_train_steps=warmup_steps, learning_rate=3e-4,
                dataloader_kwargs=dict(shuffle=True, collate_fn=collate_keep_none, drop_last=True),
                checkpoint_folder=str(Path(tmp) / "checkpoints"), checkpoint_every=10**9, log_every=10**9,
            )
            t0 = time.perf_counter()
            learner()  # warm-up steps (allocator, first-call overheads)
            t1 = time.perf_counter()
            learner.num_train_steps = warmup_steps + steps
            learner()  # timed steps: data loading + forward(s) + backward + optimizer + EMA update
            t2 = time.perf_counter()
        if int(learner.step.item()) != warmup_steps + steps:
            raise RuntimeError(f"QLearner ran {int(learner.step.item())} steps, expected {warmup_steps + steps}")
    elapsed = t2 - t1
    return dict(mode="train", config=arch.name, params=common.count_params(model), batch_size=batch_size,
                warmup_steps=warmup_steps, steps=steps, dataset_samples=len(dataset), warmup_s=t1 - t0,
                elapsed_s=elapsed, step_s=elapsed / steps, samples_per_s=steps * batch_size / elapsed,
                memories_bytes=sum(mem["files"].values()),
                patch="q_transformer.q_learner.pack_one passes None through (text-free path)")


# ---------------------------------------------------------------------------------------------

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("latency", "train", "storage", "info"))
    p.add_argument("--config", default="small", choices=sorted(common.ARCHS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--warmup", type=int, default=2, help="latency: untimed decisions first")
    p.add_argument("--iters", type=int, default=10, help="latency: timed decisions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="train: timed optimizer steps")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--episode-len", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where temporary replay memories go (default: system temp)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    _quiet()
    threads = common.pin_threads(args.threads) if args.threads > 0 else common.default_threads()
    arch = common.ARCHS[args.config]
    if args.mode == "latency":
        out = measure_latency(arch, args.warmup, args.iters, args.seed)
    elif args.mode == "train":
        out = measure_training(arch, args.batch_size, args.warmup_steps, args.steps, args.episodes,
                               args.episode_len, args.workdir, args.seed)
    elif args.mode == "storage":
        out = measure_storage(arch, args.episodes, args.episode_len, args.workdir)
    else:
        out = dict(mode="info")
    import torch
    from importlib.metadata import version

    out.update(threads=threads, torch=torch.__version__, q_transformer=version("q-transformer"),
               python=sys.executable)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
