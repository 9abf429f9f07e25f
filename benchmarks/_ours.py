"""Our side of the benchmarks, in one place: build contract/model/policy/dataset of a BenchArch size and
run the measured operations through the public API (QTransformerPolicy, ReplayWriter/ReplayDataset,
learning_step), exactly as the node and the trainer use it.

Why separate from the scripts: the scripts only orchestrate and print; if an interface of ours changes,
this is the one file to follow it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

import common

common.ensure_repo_on_path()


def ours_available() -> str | None:
    """None if our core imports, else the reason (the scripts then print the reference side only)."""
    try:
        import q_transformer_ros.core.replay_dataset  # noqa: F401
        import q_transformer_ros.core.learner  # noqa: F401
        import q_transformer_ros.core.model  # noqa: F401
        import q_transformer_ros.core.policy  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available yet"
        return f"{type(e).__name__}: {e}"
    return None


def make_contract(arch: common.BenchArch) -> Any:
    """A one-camera contract of the arch's frame size, history and action dims/bins (no instruction)."""
    from q_transformer_ros.replay.testing import tiny_contract

    return tiny_contract(num_cameras=1, size=arch.image_size, num_dims=arch.num_actions, bins=arch.action_bins,
                         frame_history=arch.frames, discount=0.98, name=f"bench_{arch.name}")


def make_net(arch: common.BenchArch, contract: Any, text_dim: int = 512) -> Any:
    from q_transformer_ros.core.model import ModelConfig, QTransformerNet

    cfg = ModelConfig.preset(arch.preset, contract, text_dim=text_dim, **arch.ours_overrides())
    return QTransformerNet(cfg)


def make_policy(arch: common.BenchArch, device: str = "cpu", compile_mode: str = "off") -> Any:
    """Policy with randomly initialised weights (latency does not depend on the weights), no instruction
    (the learned null embedding is used, like the reference's condition_on_text=False). ``compile_mode``
    as ``QTransformerPolicy``'s (compiles at the first decision)."""
    from q_transformer_ros.core.policy import QTransformerPolicy

    contract = make_contract(arch)
    net = make_net(arch, contract)
    policy = QTransformerPolicy(contract, net, None, device=device, compile_mode=compile_mode)
    policy.reset(None)
    return policy


def random_frames(arch: common.BenchArch, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, *arch.frame_shape), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------

def write_dataset(arch: common.BenchArch, folder: Path, episodes: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Write ``episodes`` x ``steps`` steps of random frames/actions with our ReplayWriter; returns sizes."""
    from q_transformer_ros.replay import EpisodeData, ReplayWriter

    contract = make_contract(arch)
    rng = np.random.default_rng(seed)
    cam = contract.cameras[0].name
    t0 = time.perf_counter()
    with ReplayWriter(folder, contract) as writer:
        for e in range(episodes):
            actions = rng.uniform(contract.action_low, contract.action_high,
                                  size=(steps, contract.num_action_dims)).astype(np.float32)
            success = bool(e % 2 == 0)
            writer.add_episode(EpisodeData(frames={cam: random_frames(arch, steps, rng)}, actions=actions,
                                           success=success, terminal=success, instruction=None,
                                           source_id=f"bench-{e}"))
    elapsed = time.perf_counter() - t0
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    allocated = {str(p.relative_to(folder)): p.stat().st_blocks * 512 for p in sorted(folder.rglob("*")) if p.is_file()}
    return dict(files=files, allocated=allocated, write_s=elapsed)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def measure_training(arch: common.BenchArch, folder: Path, batch_size: int, warmup_steps: int, steps: int,
                     seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Samples/s of our full optimizer step on a dataset written by ``write_dataset``.

    One step = ``ReplayDataset.get_batch`` (uint8 frames from the memmap) -> device -> ``learning_step``
    (online forward, one target forward over [s_t; s_t+n]) -> backward -> grad clip -> AdamW -> target EMA:
    the same work as the reference QLearner step (data loading + forwards + backward + optimizer + EMA)."""
    import torch

    from q_transformer_ros.core.replay_dataset import ReplayDataset
    from q_transformer_ros.core.learner import (
        LearnerConfig, learning_step, make_target_network, update_target_network,
    )

    torch.manual_seed(seed)
    dev = torch.device(device)
    ds = ReplayDataset(folder)
    net = make_net(arch, ds.contract).to(dev).train()
    target = make_target_network(net)
    lcfg = LearnerConfig(discount=ds.contract.discount)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    step_no = 0

    def one_step() -> None:
        nonlocal step_no
        idx = rng.choice(len(ds), size=batch_size, replace=len(ds) < batch_size)
        batch = ds.get_batch(idx).training_view().to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = learning_step(batch, net, target, None, lcfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step_no += 1
        update_target_network(net, target, step_no, lcfg)

    for _ in range(warmup_steps):
        one_step()
    common.cuda_sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    common.cuda_sync()
    elapsed = time.perf_counter() - t0
    return dict(params=common.count_params(net), batch_size=batch_size, steps=steps, dataset_samples=len(ds),
                elapsed_s=elapsed, step_s=elapsed / steps, samples_per_s=steps * batch_size / elapsed)
