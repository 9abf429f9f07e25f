"""The ``train`` executable: replay dataset(s) -> Q-Transformer checkpoint.

Usage::

    train --config config/train_tiny.yaml --dataset DIR --out runs/x --steps 50
    train --config config/train_base.yaml --dataset A --dataset B --set learner.td_loss=bce --set lr=1e-4
    torchrun --nproc_per_node 8 -m q_transformer_ros.core.trainer --config config/train_base.yaml ...

YAML is the source of truth (``TrainConfig`` fields, nested ``learner:``, ``model_overrides:`` and
``text_encoder:`` mappings); flags and ``--set key=value`` (value parsed as YAML, dotted keys for nested
mappings) override it. A run resumes from ``<out>/checkpoint.pt`` when it exists (``--resume`` makes a
missing checkpoint an error, ``--no-resume`` starts over): same step, same data order, same RNG streams.

Three parts (lerobot's train script and CleanRL's loop are the pattern): :func:`build_run` makes the run
(contract, datasets, instruction table, model, optimizer, data order; fresh or resumed), :func:`update_step`
does one optimizer step (micro-batches of :func:`learning_step`, clipping, target update), and
:func:`_train` is the loop around it that logs (metrics.jsonl, TensorBoard, progress bar) and checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from q_transformer_ros.config_io import dataclass_from_dict, load_yaml
from q_transformer_ros.core.augment import random_shift
from q_transformer_ros.core.batch import Batch
from q_transformer_ros.core.checkpoint import (
    CHECKPOINT_NAME, CheckpointError, load_checkpoint, remove_stale_temp_files, rng_state, save_checkpoint,
    set_rng_state,
)
from q_transformer_ros.core.distributed import (
    DistInfo, ShardedBatchSampler, barrier, check_in_sync, init_distributed, shutdown_distributed,
)
from q_transformer_ros.core.learner import LearnerConfig, learning_step, make_target_network, update_target_network
from q_transformer_ros.core.metrics import MetricsLogger, plot_metrics
from q_transformer_ros.core.run_lock import RunLock, RunLockError
from q_transformer_ros.core.schedule import warmup_cosine_scheduler
from q_transformer_ros.contract import ContractError, RobotContract, load_contract

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "metrics.png"
CONFIG_NAME = "train_config.yaml"


class TrainError(RuntimeError):
    """Training cannot go on; the message names the input (file, key, step) and the bad value."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Loaded from YAML, overridden from the command line."""

    dataset: list[str] = field(default_factory=list)
    """Replay dataset folder(s); several are concatenated (same robot contract, instruction tables merged)."""
    out: str = "runs/train"
    """Output folder: checkpoint.pt, metrics.jsonl, metrics.png, train_config.yaml."""
    contract: str | None = None
    """Contract YAML to train with (its bins/ranges re-bin the stored actions); default: the first
    dataset's embedded contract. Datasets from a different robot are rejected."""
    model_preset: str = "tiny"
    """ModelConfig preset: 'tiny' | 'small' | 'base' (robot fields come from the contract)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields overriding the preset, e.g. {dual_critics: true, value_bins: 51}."""
    text_encoder: dict[str, Any] = field(default_factory=dict)
    """TextEncoderConfig fields (model_name, pretrained: null | local weights file | hub tag, ...)."""
    objective: Literal["q_learning", "bc"] = "q_learning"
    """'q_learning' (Q-Transformer) or 'bc' (behaviour-cloning baseline on the same network)."""
    learner: dict[str, Any] = field(default_factory=dict)
    """LearnerConfig fields other than objective/discount/cond_drop_prob (td_loss, conservative_weight,
    mc_lower_bound, target_update, target_ema_tau, target_copy_every, ...)."""
    n_step: int = 1
    """Rewards summed before bootstrapping (n-step returns)."""
    batch_size: int = 32
    """Samples per micro-batch per process (global batch = batch_size * grad_accum * world size)."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only (not biases, norms, embeddings of size 1-D)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` at the end of the cosine."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 = no clipping; the norm is still logged)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    discount: float | None = None
    """Discount gamma for this training run; None = the contract's. Why an override: the signal that tells
    bins apart at a state scales with its value, about gamma^(steps to success), so an episode of 100
    control steps at gamma 0.98 teaches its first decisions with ~0.13 of the signal of its last ones;
    a run may want a longer horizon than the contract was written with. Stored in the checkpoint's
    learner config (the checkpoint's contract keeps the robot's value)."""
    augment_shift_px: int = 0
    """DrQ random-shift augmentation of training images by up to this many pixels (edges replicated;
    the current and the next observation shifted independently); 0 = off. 4 is DrQ's for 84 px images."""
    bf16: bool = True
    """bf16 autocast for forward passes on CUDA (ignored on CPU, where fp32 is used)."""
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this)."""
    cond_drop_prob: float | None = None
    """Instruction dropout probability (classifier-free); None = the model config's ``cond_drop_prob``."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (one is always written at the end)."""
    log_every: int = 10
    """Optimizer steps between metric records."""
    num_workers: int = 0
    """DataLoader worker processes (each assembles whole batches with ``get_batch``)."""
    seed: int = 0
    """Seed of model init, data order and dropout (the run is reproducible on the same device)."""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda' or 'cuda:N' (under torchrun: the local rank's GPU)."""
    resume: Literal["auto", "require", "never"] = "auto"
    """'auto': resume from <out>/checkpoint.pt if present; 'require': error if absent; 'never': start over
    (an existing checkpoint is overwritten)."""
    find_unused_parameters: bool = False
    """DDP option; set true if a model variant leaves parameters without gradient in a step."""
    progress: bool = True
    """tqdm progress bar (main process only)."""
    threads: int = 0
    """Torch intra-op threads on CPU; 0 = automatic: one per core not kept busy by other processes
    (measured over half a second at start, ``busy_cores``), at least 1. Why: on a 2-core machine where
    another process keeps a core busy, 2-thread training ran 5-10x slower than idle, while 1 thread ran
    2x faster than 2 under the same load."""
    tensorboard: bool = True
    """Also write TensorBoard event files into ``out`` (``tensorboard --logdir runs/``)."""

    def __post_init__(self) -> None:
        if isinstance(self.dataset, (str, Path)):
            self.dataset = [str(self.dataset)]
        self.dataset = [str(d) for d in self.dataset]
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def _bad(self, key: str, why: str) -> ValueError:
        return ValueError(f"TrainConfig.{key} = {getattr(self, key)!r}: {why}")

    def validate(self) -> None:
        if self.objective not in ("q_learning", "bc"):
            raise self._bad("objective", "must be 'q_learning' or 'bc'")
        for key in ("n_step", "batch_size", "grad_accum", "steps", "checkpoint_every", "log_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise self._bad(key, "must be an integer >= 1")
        for key in ("warmup_steps", "num_workers", "seed", "augment_shift_px", "threads"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise self._bad(key, "must be an integer >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise self._bad("lr", "must be > 0")
        if not self.weight_decay >= 0:
            raise self._bad("weight_decay", "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise self._bad("betas", "must be two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise self._bad("min_lr_ratio", "must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise self._bad("grad_clip", "must be >= 0")
        if self.discount is not None and not (isinstance(self.discount, (int, float)) and 0 < self.discount <= 1):
            raise self._bad("discount", "must be null or in (0, 1]")
        if self.cond_drop_prob is not None and not 0 <= self.cond_drop_prob < 1:
            raise self._bad("cond_drop_prob", "must be null or in [0, 1)")
        if self.resume not in ("auto", "require", "never"):
            raise self._bad("resume", "must be 'auto', 'require' or 'never'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise self._bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        for key in ("model_overrides", "text_encoder", "learner"):
            if not isinstance(getattr(self, key), Mapping):
                raise self._bad(key, "must be a mapping")
        bad = {"objective", "discount", "cond_drop_prob"} & set(self.learner)
        if bad:
            raise self._bad("learner", f"set {sorted(bad)} at top level (objective, cond_drop_prob) or in the contract (discount)")
        if not isinstance(self.model_preset, str):
            raise self._bad("model_preset", "must be a preset name")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "<train config>") -> "TrainConfig":
        return dataclass_from_dict(cls, data, where)


# ---------------------------------------------------------------------------------------------
# config from YAML + command line
# ---------------------------------------------------------------------------------------------

def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"--set {key}: '{p}' is not a mapping (it is {nxt!r})")
        cur = nxt
    cur[parts[-1]] = value


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Train a Q-Transformer on replay datasets.")
    p.add_argument("--config", help="training YAML (TrainConfig fields), e.g. config/train_tiny.yaml")
    p.add_argument("--dataset", action="append", help="replay dataset folder (repeat for several)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--contract", help="contract YAML to train with (default: the dataset's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--objective", choices=("q_learning", "bc"))
    p.add_argument("--n-step", type=int, dest="n_step")
    p.add_argument("--device")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, dest="num_workers")
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every")
    p.add_argument("--model-preset", dest="model_preset")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_const", const="require", dest="resume",
                   help="resume from <out>/checkpoint.pt (error if absent)")
    g.add_argument("--no-resume", action="store_const", const="never", dest="resume",
                   help="start over even if <out>/checkpoint.pt exists")
    p.add_argument("--no-progress", action="store_false", dest="progress", default=None)
    p.add_argument("--no-tensorboard", action="store_false", dest="tensorboard", default=None,
                   help="do not write TensorBoard event files (metrics.jsonl and metrics.png are always written)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field; VALUE is YAML; dotted keys reach nested mappings (learner.td_loss=bce)")
    return p


def config_from_args(argv: Sequence[str] | None) -> TrainConfig:
    args = build_arg_parser().parse_args(argv)
    data: dict[str, Any] = {}
    where = "<command line>"
    if args.config:
        path = Path(args.config)
        where = str(path)
        if not path.is_file():
            raise TrainError(f"{path}: training config file does not exist")
        try:
            loaded = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise TrainError(f"{path}: expected a mapping of TrainConfig fields, got {type(loaded).__name__}")
        data.update(loaded)
    for key in ("out", "contract", "steps", "batch_size", "lr", "objective", "n_step", "device", "seed",
                "num_workers", "checkpoint_every", "model_preset", "resume", "progress", "tensorboard"):
        v = getattr(args, key)
        if v is not None:
            data[key] = v
    if args.dataset:
        data["dataset"] = args.dataset
    for item in args.set:
        if "=" not in item:
            raise TrainError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        _set_dotted(data, k.strip(), load_yaml(v))
    try:
        return TrainConfig.from_dict(data, where=where)
    except ValueError as e:
        raise TrainError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

class BatchDataset(Dataset):
    """Maps a list of indices to one whole :class:`Batch`: the DataLoader (``batch_size=None``) is fed the
    batch sampler's index lists, so workers call the vectorised ``get_batch`` once per batch (the
    loader's default_convert passes the Batch through as it is; ``pin_memory`` calls its method).

    Several datasets are concatenated; their instruction tables are merged (``instructions``) and each
    dataset's ``instruction_index`` is remapped into the merged table."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)
        sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.instructions: list[str] = []
        pos: dict[str, int] = {}
        self.remaps: list[np.ndarray] = []
        for d in self.datasets:
            remap = []
            for text in d.instructions:
                if text not in pos:
                    pos[text] = len(self.instructions)
                    self.instructions.append(text)
                remap.append(pos[text])
            self.remaps.append(np.array(remap, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        parts: list[Batch] = []
        order = []
        for k in np.unique(which):
            rows = np.flatnonzero(which == k)
            b = self.datasets[k].get_batch(idx[rows] - self.offsets[k])
            ii = b.instruction_index.numpy()
            if self.remaps[k].size:
                ii = np.where(ii >= 0, self.remaps[k][ii.clip(min=0)], -1)
            parts.append(dataclasses.replace(b, instruction_index=torch.from_numpy(ii.astype(np.int64))))
            order.append(rows)
        if len(parts) == 1:
            return parts[0]
        inv = np.argsort(np.concatenate(order))
        return Batch.concat(parts).index(torch.from_numpy(inv))


def open_datasets(cfg: TrainConfig, contract: RobotContract | None) -> tuple[list[Any], RobotContract]:
    """Open every dataset with the training contract; errors name the dataset path."""
    from q_transformer_ros.replay import DatasetError
    from q_transformer_ros.replay.format import MANIFEST_NAME, read_manifest
    from q_transformer_ros.core.replay_dataset import ReplayDataset

    if not cfg.dataset:
        raise TrainError("no dataset given: pass --dataset DIR (or 'dataset:' in the config)")
    if cfg.discount is not None:  # read with this discount (returns and bootstraps are computed with it)
        if contract is None:  # the first dataset's, as below
            first = Path(cfg.dataset[0])
            try:
                contract = read_manifest(first).robot_contract(str(first / MANIFEST_NAME))
            except (DatasetError, ContractError, OSError) as e:
                raise TrainError(f"dataset {first}: {e}") from None
    robot = contract  # what the checkpoint carries: the robot's own contract, its discount included
    if cfg.discount is not None:
        contract = dataclasses.replace(contract, discount=float(cfg.discount))
    out = []
    for path in cfg.dataset:
        p = Path(path)
        if not p.exists():
            raise TrainError(f"dataset path {p} does not exist")
        try:
            ds = ReplayDataset(p, contract=contract, n_step=cfg.n_step)
        except (DatasetError, ContractError) as e:
            raise TrainError(f"dataset {p}: {e}") from None
        if len(ds) == 0:
            raise TrainError(f"dataset {p} is empty (no samples)")
        if contract is None:
            contract = ds.contract
        out.append(ds)
    assert contract is not None
    return out, (robot if robot is not None else contract)


def instruction_table(
    cfg: TrainConfig, data: BatchDataset, device: torch.device, info: DistInfo,
    from_checkpoint: Mapping[str, Any] | None,
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Embeddings (I, T) of the merged instruction table, on ``device``; plus the encoder config dict and T.

    Order of preference: the checkpoint's cache (same texts: a resumed run keeps its conditioning), the
    dataset's cache for this encoder key, then the encoder (result written back into a single dataset's
    cache by the main process, when the folder is writable)."""
    from q_transformer_ros.core.text_encoder import InstructionEncoder, TextEncoderConfig

    try:
        enc_cfg = TextEncoderConfig(**cfg.text_encoder)
    except (TypeError, ValueError) as e:
        raise TrainError(f"text_encoder: {e}") from None
    texts = data.instructions
    if from_checkpoint is not None and list(from_checkpoint.get("texts", [])) == texts:
        emb = from_checkpoint["embeddings"].float()
        return emb.to(device), _enc_dict(enc_cfg), int(emb.shape[1])
    torch.manual_seed(cfg.seed)  # random-init encoders (tests) are then reproducible
    encoder = InstructionEncoder(enc_cfg)
    key, dim = encoder.key, encoder.dim
    emb_np = None
    if len(data.datasets) == 1 and texts:
        emb_np = data.datasets[0].text_embeddings(key)
    if emb_np is None and texts:
        with torch.no_grad():
            emb_np = encoder.embed(texts).float().cpu().numpy()
        if info.is_main and len(data.datasets) == 1:
            _cache_embeddings(data.datasets[0], key, emb_np)
    del encoder
    emb = torch.from_numpy(np.asarray(emb_np, dtype=np.float32)) if texts else torch.zeros(0, dim)
    return emb.to(device), _enc_dict(enc_cfg), dim


def _enc_dict(enc_cfg: Any) -> dict[str, Any]:
    to_dict = getattr(enc_cfg, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else asdict(enc_cfg)


def _cache_embeddings(ds: Any, key: str, emb: np.ndarray) -> None:
    from q_transformer_ros.replay import ReplayWriter

    try:
        with ReplayWriter(ds.root, ds.dataset_contract, create_ok=False) as w:
            w.set_text_embeddings(key, emb)
    except Exception as e:  # read-only dataset, a busy writer: the cache is an optimisation only
        print(f"train: note: could not cache text embeddings in {ds.root}: {e}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# model, optimizer
# ---------------------------------------------------------------------------------------------

def busy_cores(window_s: float = 0.5, stat: Path = Path("/proc/stat")) -> float | None:
    """Cores kept busy by OTHER processes right now: the machine's busy CPU time over ``window_s``
    (``/proc/stat``) minus this process's own, in cores. None where ``/proc`` is not available.

    Why not the load average: it is a one-minute moving average, so a process that ended seconds ago
    still counts. The demo trains right after its own recording stage (sim, expert, recorder on both
    cores); the load average then read ~1.5 on an idle machine and training got 1 thread instead of 2
    (session 8: 530 s instead of ~300 s for the Q-Transformer's 4000 steps)."""
    def sample() -> tuple[int, int, float]:
        fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = os.times()
        return sum(fields[:8]), idle, own.user + own.system
    try:
        total0, idle0, own0 = sample()
        time.sleep(window_s)
        total1, idle1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ticks = total1 - total0
    if ticks <= 0:
        return None
    cpus = os.cpu_count() or 1
    busy = (ticks - (idle1 - idle0)) / ticks * cpus  # cores busy, this process included
    own = (own1 - own0) / window_s  # this process's cores (seconds of CPU per second)
    return max(0.0, busy - own)


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """Threads for CPU training: the cores not kept busy by other processes (``busy_cores``, else the
    load average), at least 1."""
    cores = cores if cores is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    if load is None:
        load = busy_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform: assume idle
            load = 0.0
    return max(1, cores - int(round(load)))


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"device = {name!r} but CUDA is not available on this machine")
        if info.enabled:
            return torch.device("cuda", info.local_rank)
    return torch.device(name)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on >= 2-D weights (not biases, norm gains, per-channel scales)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in model.parameters())
    # fused kernel on CUDA; multi-tensor (foreach) on CPU, where the per-tensor loop dominates tiny models
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True if on_cuda else None,
                             foreach=None if on_cuda else True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a finished run produced."""

    step: int
    """Optimizer steps done (== TrainConfig.steps)."""
    checkpoint: Path
    metrics: Path
    plot: Path | None
    last_metrics: dict[str, float]
    param_checksum: float
    """Checksum of the online parameters (equal across ranks; used by the resume / DDP tests)."""


@dataclass
class TrainRun:
    """Everything a run holds between optimizer steps; made once by :func:`build_run` (fresh or resumed)."""

    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    out: Path
    contract: RobotContract
    data: BatchDataset
    instruction_embeddings: torch.Tensor
    """(I, T) embeddings of ``data.instructions``, on ``device``."""
    text_encoder: dict[str, Any]
    model_cfg: Any
    lcfg: LearnerConfig
    model: nn.Module
    ddp_model: nn.Module
    """``model`` wrapped in DistributedDataParallel under torchrun, else ``model`` itself."""
    target: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: ShardedBatchSampler
    loader: DataLoader
    step: int = 0
    consumed: int = 0
    """Micro-batches drawn from the sampler so far (the data order's position, for exact resume)."""
    resumed: bool = False

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def payload(self) -> dict[str, Any]:
        """The checkpoint: enough to serve (contract, configs, weights, instruction table) and to resume."""
        return {
            "contract": self.contract.to_dict(),
            "model_config": self.model_cfg.to_dict(),
            "text_encoder": self.text_encoder,
            "objective": self.cfg.objective,
            "learner_config": self.lcfg.to_dict(),
            "model": self.model.state_dict(),
            "target_model": self.target.state_dict() if self.target is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": {f"rank{self.info.rank}": rng_state()},
            "data_order": self.sampler.position(self.consumed),
            "instruction_embeddings": {"texts": list(self.data.instructions),
                                       "embeddings": self.instruction_embeddings.detach().cpu()},
            "train_config": self.cfg.to_dict(),
        }


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) training; returns when ``cfg.steps`` optimizer steps are done."""
    from q_transformer_ros.core.model import ModelConfig, QTransformerNet

    device_kind = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    info = init_distributed(device_kind)
    threads_before = torch.get_num_threads()
    try:
        # one run per --out (rank 0 holds it; torchrun stops the other ranks when rank 0 fails)
        with RunLock(cfg.out) if info.is_main else nullcontext():
            if info.is_main:
                remove_stale_temp_files(cfg.out)  # what killed checkpoint writes left; we hold the lock
            return _train(build_run(cfg, info, ModelConfig, QTransformerNet))
    except RunLockError as e:
        raise TrainError(str(e)) from None
    finally:
        torch.set_num_threads(threads_before)  # a library call leaves the process as it found it
        shutdown_distributed()


# -- building the run ----------------------------------------------------------------------------

def load_resume_point(cfg: TrainConfig) -> tuple[RobotContract | None, dict[str, Any] | None]:
    """The training contract (``--contract``, else the checkpoint's, else None: the dataset's) and the
    checkpoint to resume from (None for a fresh run), checked against this run's objective."""
    ckpt_path = Path(cfg.out) / CHECKPOINT_NAME
    contract = None
    if cfg.contract:
        try:
            contract = load_contract(cfg.contract)
        except ContractError as e:
            raise TrainError(str(e)) from None
    resume_from = None
    if cfg.resume != "never" and ckpt_path.exists():
        try:
            resume_from = load_checkpoint(ckpt_path, map_location="cpu", expected_contract=contract)
        except CheckpointError as e:
            raise TrainError(f"cannot resume: {e}") from None
        if resume_from["objective"] != cfg.objective:
            raise TrainError(f"cannot resume {ckpt_path}: it was trained with objective "
                             f"{resume_from['objective']!r}, this run asks for {cfg.objective!r}")
        if contract is None:
            contract = RobotContract.from_dict(resume_from["contract"], where=f"{ckpt_path}:contract")
    elif cfg.resume == "require":
        raise TrainError(f"--resume given but {ckpt_path} does not exist")
    return contract, resume_from


def build_model(
    cfg: TrainConfig, contract: RobotContract, text_dim: int, resume_from: Mapping[str, Any] | None,
    ModelConfig: Any, QTransformerNet: Any,
) -> tuple[Any, LearnerConfig, nn.Module]:
    """Model config (the checkpoint's when resuming, else preset + overrides), learner config, network."""
    if resume_from is not None:
        model_cfg = ModelConfig.from_dict(resume_from["model_config"], where=f"{cfg.out}/{CHECKPOINT_NAME}:model_config")
    else:
        try:
            model_cfg = ModelConfig.preset(cfg.model_preset, contract, text_dim=text_dim, **cfg.model_overrides)
        except (TypeError, ValueError) as e:
            raise TrainError(f"model_preset {cfg.model_preset!r} / model_overrides {cfg.model_overrides}: {e}") from None
    cond_drop = model_cfg.cond_drop_prob if cfg.cond_drop_prob is None else cfg.cond_drop_prob
    try:
        discount = contract.discount if cfg.discount is None else float(cfg.discount)
        lcfg = LearnerConfig.from_dict({**cfg.learner, "objective": cfg.objective, "discount": discount,
                                        "cond_drop_prob": cond_drop})
    except (TypeError, ValueError) as e:
        raise TrainError(f"learner: {e}") from None
    if lcfg.objective == "q_learning" and (model_cfg.value_bins > 1) != (lcfg.td_loss == "hl_gauss"):
        raise TrainError(f"learner.td_loss = {lcfg.td_loss!r} with model value_bins = {model_cfg.value_bins}: "
                         "use td_loss 'hl_gauss' exactly when value_bins > 1")
    if lcfg.objective == "bc" and model_cfg.value_bins > 1:
        raise TrainError("objective 'bc' needs a model with value_bins = 1")
    return model_cfg, lcfg, QTransformerNet(model_cfg)


def restore(run: TrainRun, resume_from: Mapping[str, Any]) -> None:
    """Weights, optimizer, schedule, step, data position and RNG streams of the checkpoint."""
    run.model.load_state_dict(resume_from["model"])
    if run.target is not None and resume_from.get("target_model") is not None:
        run.target.load_state_dict(resume_from["target_model"])
    run.optimizer.load_state_dict(resume_from["optimizer"])
    run.scheduler.load_state_dict(resume_from["scheduler"])
    run.step = int(resume_from["step"])
    order = resume_from.get("data_order", {})
    run.consumed = int(order.get("consumed_batches", run.step * run.cfg.grad_accum))
    info, cfg = run.info, run.cfg
    if order.get("world_size", info.world_size) != info.world_size or order.get("seed", cfg.seed) != cfg.seed:
        print(f"train: note: resuming with world size {info.world_size} / seed {cfg.seed} (checkpoint: "
              f"{order.get('world_size')} / {order.get('seed')}); the data order differs from the killed run",
              file=sys.stderr)
    rs = resume_from.get("rng", {}).get(f"rank{info.rank}") or resume_from.get("rng", {}).get("rank0")
    if rs is not None:
        set_rng_state(rs)
    run.resumed = True
    if info.is_main:
        print(f"train: resuming {run.checkpoint_path} at step {run.step}", file=sys.stderr)


def make_loader(data: BatchDataset, cfg: TrainConfig, info: DistInfo, device: torch.device,
                consumed: int) -> tuple[ShardedBatchSampler, DataLoader]:
    """This rank's shard of the batch order, starting after the ``consumed`` micro-batches."""
    sampler = ShardedBatchSampler(len(data), cfg.batch_size, seed=cfg.seed, rank=info.rank,
                                  world_size=info.world_size, start_batch=consumed)
    loader = DataLoader(
        data, batch_size=None, sampler=sampler, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=2 if cfg.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG untouched (exact resume)
    )
    return sampler, loader


def build_run(cfg: TrainConfig, info: DistInfo, ModelConfig: Any, QTransformerNet: Any) -> TrainRun:
    """Contract, datasets, instruction table, model, optimizer and data order: fresh, or as checkpointed."""
    device = pick_device(cfg.device, info)
    if device.type == "cpu" and not info.enabled:
        threads = cfg.threads or auto_threads()
        torch.set_num_threads(threads)
        if info.is_main:
            print(f"train: {threads} torch thread(s) on CPU", file=sys.stderr)
    contract, resume_from = load_resume_point(cfg)
    datasets, contract = open_datasets(cfg, contract)
    data = BatchDataset(datasets)
    seed_everything(cfg.seed)
    emb, enc_dict, text_dim = instruction_table(
        cfg, data, device, info, resume_from.get("instruction_embeddings") if resume_from else None)
    seed_everything(cfg.seed)
    model_cfg, lcfg, model = build_model(cfg, contract, text_dim, resume_from, ModelConfig, QTransformerNet)
    model = model.to(device)
    target = make_target_network(model) if lcfg.objective == "q_learning" else None
    optimizer = make_optimizer(model, cfg)
    scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    run = TrainRun(cfg=cfg, info=info, device=device, out=Path(cfg.out), contract=contract, data=data,
                   instruction_embeddings=emb, text_encoder=enc_dict, model_cfg=model_cfg, lcfg=lcfg,
                   model=model, ddp_model=model, target=target, optimizer=optimizer, scheduler=scheduler,
                   sampler=None, loader=None)  # type: ignore[arg-type]  (set below, after the restore)
    if resume_from is not None:
        restore(run, resume_from)
    if info.enabled:
        run.ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)
    run.sampler, run.loader = make_loader(data, cfg, info, device, run.consumed)
    return run


# -- one update ----------------------------------------------------------------------------------

def update_step(run: TrainRun, batches: Iterator[Batch]) -> tuple[dict[str, float], int]:
    """One optimizer step: ``grad_accum`` micro-batches of :func:`learning_step`, clipping, the optimizer
    and schedule step, the target-network update. Returns the step's metrics and the samples it used
    (all ranks)."""
    cfg, info = run.cfg, run.info
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if (cfg.bf16 and run.device.type == "cuda")
                else nullcontext())
    agg: dict[str, torch.Tensor] = {}
    samples = 0
    for micro in range(cfg.grad_accum):
        batch = next(batches).training_view()  # the bookkeeping fields are dropped, never moved
        run.consumed += 1
        batch = batch.to(run.device, non_blocking=True)
        if cfg.augment_shift_px > 0:
            frames = random_shift(batch.frames, cfg.augment_shift_px)
            next_frames = random_shift(batch.next_frames, cfg.augment_shift_px)
            batch = dataclasses.replace(batch, frames=frames, next_frames=next_frames)
        sync = info.enabled and micro < cfg.grad_accum - 1
        with (run.ddp_model.no_sync() if sync else nullcontext()):
            with autocast:
                loss, metrics = learning_step(batch, run.ddp_model, run.target, run.instruction_embeddings, run.lcfg)
            if not torch.isfinite(loss):
                raise TrainError(
                    f"non-finite loss {float(loss.detach())} at step {run.step + 1} (micro-batch {micro}); metrics: "
                    f"{ {k: float(v) for k, v in metrics.items()} }. Check the dataset for NaN/inf "
                    f"rewards or actions, or lower lr (now {run.scheduler.get_last_lr()[0]:.3g})")
            (loss / cfg.grad_accum).backward()
        for k, v in metrics.items():
            agg[k] = agg.get(k, 0.0) + v.float() / cfg.grad_accum
        samples += batch.batch_size * info.world_size
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    if not torch.isfinite(grad_norm):
        raise TrainError(f"non-finite gradient norm {float(grad_norm)} at step {run.step + 1}")
    lr_now = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if run.target is not None:
        update_target_network(run.model, run.target, run.step, run.lcfg)
    out = {k: float(v) for k, v in agg.items()}
    out.update({"grad_norm": float(grad_norm), "lr": lr_now})
    return out, samples


# -- the loop ------------------------------------------------------------------------------------

def _train(run: TrainRun) -> TrainResult:
    cfg, info, out = run.cfg, run.info, run.out
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger = (MetricsLogger(out / METRICS_NAME, resume_step=run.step if run.resumed else None,
                            tensorboard_dir=out if cfg.tensorboard else None) if info.is_main else None)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True)
    last: dict[str, float] = {}
    batches = iter(run.loader)
    t_last, samples_since = time.perf_counter(), 0
    run.model.train()
    try:
        while run.step < cfg.steps:
            metrics, samples = update_step(run, batches)
            samples_since += samples
            if run.step % cfg.log_every == 0 or run.step == cfg.steps:
                now = time.perf_counter()
                last = {**metrics, "charts/samples_per_s": samples_since / max(now - t_last, 1e-9)}
                t_last, samples_since = now, 0
                if logger is not None:
                    logger.log(run.step, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['losses/loss']:.4f}", q=f"{last.get('q/mean_q', float('nan')):.3f}")
            if bar is not None:
                bar.update(1)
            if run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
                if info.is_main:
                    save_checkpoint(run.checkpoint_path, run.payload())
                barrier(info)
        checksum = check_in_sync(run.model, info, run.device)
        if info.is_main:
            save_checkpoint(run.checkpoint_path, run.payload())
        barrier(info)
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
        del batches
    plot = plot_metrics(out / METRICS_NAME, out / PLOT_NAME) if info.is_main else None
    return TrainResult(step=run.step, checkpoint=run.checkpoint_path, metrics=out / METRICS_NAME, plot=plot,
                       last_metrics=last, param_checksum=checksum)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``train`` executable. Returns 0 on success, 2 on bad input (message on stderr)."""
    from q_transformer_ros.replay import DatasetError

    try:
        cfg = config_from_args(argv)
        result = train(cfg)
    except (TrainError, DatasetError, ContractError, CheckpointError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    print(f"train: rank {rank} finished step {result.step} param_checksum {result.param_checksum:.10e}")
    if rank == 0:
        print(f"train: checkpoint {result.checkpoint}")
        print(f"train: metrics {result.metrics}" + (f", plot {result.plot}" if result.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
