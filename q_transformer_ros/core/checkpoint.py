"""Training checkpoints: one file that holds everything to resume training or to run the policy.

Why this shape: the policy node must rebuild the network from the checkpoint alone (contract, model
config, text-encoder config, cached instruction embeddings travel with the weights), and a killed
training run must continue at the same step with the same data order and RNG streams (optimizer,
scheduler, target network, RNG states, data order). Everything is stored as tensors, numbers, strings,
lists and dicts, so ``torch.load(weights_only=True)`` can read it: loading our checkpoints never runs
pickled code. Files are written to a temp path and renamed, so a crash never leaves half a checkpoint.

Integrity: silent corruption (a flipped bit on disk or in a copy) must not load. Each file carries a
sha256 of its payload (every tensor's bytes, dtype and shape, every number and string, in a canonical
order; ``payload_sha256``), checked on load, and every zip record's CRC-32 (which torch writes but
never checks) is verified first. A mismatch is a CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from q_transformer_ros.contract import ContractError, RobotContract

CHECKPOINT_KIND = "q_transformer_ros/checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
"""File name of the latest checkpoint inside a training output directory."""

DIGEST_KEY = "payload_sha256"
REQUIRED_KEYS = ("format_version", "kind", "contract", "model_config", "text_encoder", "objective", "model", "step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus kind and format_version) atomically: temp file in the same folder, fsync,
    ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data.pop(DIGEST_KEY, None)
    data["kind"] = CHECKPOINT_KIND
    data["format_version"] = CHECKPOINT_FORMAT_VERSION
    data[DIGEST_KEY] = payload_digest(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def payload_digest(data: Mapping[str, Any]) -> str:
    """sha256 over a canonical walk of a checkpoint payload (without its own digest): dict keys sorted,
    tensors as dtype + shape + bytes, scalars and strings by type and value."""
    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, Mapping):
            keys = sorted((k for k in obj if k != DIGEST_KEY), key=str)
            h.update(b"D%d" % len(keys))
            for key in keys:
                h.update(f"K{key!s}".encode())
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            h.update(b"L%d" % len(obj))
            for item in obj:
                walk(item)
        else:
            h.update(f"V{type(obj).__name__}:{obj!r}".encode())

    walk(data)
    return h.hexdigest()


def _check_zip_records(path: Path) -> None:
    """Verify the CRC-32 of every record of torch's zip container (torch itself does not)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint (not a valid torch zip archive: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint: record '{bad}' fails its CRC-32 check "
                              f"(bits changed on disk or in a copy); use another copy or the previous checkpoint")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def remove_stale_temp_files(folder: str | Path, name: str = CHECKPOINT_NAME) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files that killed writes left in ``folder``. Only call it while
    no other process writes there (the trainer holds its run lock)."""
    removed = []
    for tmp in Path(folder).glob(f".{name}.tmp-*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def save_untrained_checkpoint(
    path: str | Path,
    contract: RobotContract,
    *,
    preset: str = "tiny",
    text_encoder: Mapping[str, Any] | None = None,
    text_dim: int = 512,
    instructions: Sequence[str] = (),
    seed: int = 0,
) -> Path:
    """A checkpoint of a randomly initialised network for ``contract``: what tests, benchmarks and a
    first wiring-up of a robot need before any training (latency and plumbing do not depend on weights).

    Random embeddings for ``instructions`` are cached in it, as the trainer caches the training
    instructions, so loading it never builds the text model. ``text_encoder``: TextEncoderConfig fields
    (default: the default config), whose embedding width must be ``text_dim``."""
    from q_transformer_ros.core.model import ModelConfig, QTransformerNet  # noqa: PLC0415 - torch-heavy
    from q_transformer_ros.core.text_encoder import TextEncoderConfig  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset, contract, text_dim=text_dim)
    text = TextEncoderConfig.from_dict(dict(text_encoder or {}), where="save_untrained_checkpoint(text_encoder)")
    return save_checkpoint(path, {
        "contract": contract.to_dict(), "model_config": cfg.to_dict(), "text_encoder": text.to_dict(),
        "objective": "q_learning", "model": QTransformerNet(cfg).state_dict(), "step": 0,
        "instruction_embeddings": {"texts": list(instructions), "embeddings": torch.randn(len(instructions), text_dim)},
    })


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    expected_contract: RobotContract | None = None,
) -> dict[str, Any]:
    """Read and validate a checkpoint (``weights_only=True``).

    Raises CheckpointError naming the file when it is missing, not a torch file, not one of ours, of a
    newer format, lacks keys, or (with ``expected_contract``) was trained for a different robot:
    different cameras/action dims, or a different number of bins per dim (the head's width)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes): an interrupted copy or download? Use another copy")
    if zipfile.is_zipfile(path):
        _check_zip_records(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not loadable with torch.load(weights_only=True) (not a q_transformer_ros "
                              f"checkpoint, or it holds arbitrary pickled objects): {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds (some with empty messages) for bad files
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(data, dict) or data.get("kind") != CHECKPOINT_KIND:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: not a q_transformer_ros checkpoint (kind = {kind!r}, expected {CHECKPOINT_KIND!r})")
    version = data.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: 'format_version' = {version!r}; this package reads version {CHECKPOINT_FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks key(s) {missing}")
    stored = data.get(DIGEST_KEY)
    if stored is not None and stored != payload_digest(data):
        raise CheckpointError(f"{path}: corrupt checkpoint: its payload does not match the sha256 stored in it "
                              f"(the file changed after it was written); use another copy or the previous checkpoint")
    try:
        contract = RobotContract.from_dict(data["contract"], where=f"{path}:contract")
    except ContractError as e:
        raise CheckpointError(f"{path}: embedded contract is invalid: {e}") from None
    bins = tuple(data["model_config"].get("action_bins", ()))
    if bins and bins != tuple(contract.action_bins):
        raise CheckpointError(f"{path}: model_config.action_bins {bins} disagree with the embedded contract's "
                              f"{tuple(contract.action_bins)}")
    if expected_contract is not None:
        try:
            expected_contract.check_compatible(contract, what="checkpoint", where=str(path), allow_rebin=True)
        except ContractError as e:
            raise CheckpointError(str(e)) from None
        if tuple(expected_contract.action_bins) != tuple(contract.action_bins):
            raise CheckpointError(
                f"{path}: checkpoint was trained with {contract.num_action_dims} action dims x bins "
                f"{tuple(contract.action_bins)} (num_actions), but contract '{expected_contract.name}' has bins "
                f"{tuple(expected_contract.action_bins)}"
            )
    return data


def checkpoint_contract(data: Mapping[str, Any], where: str = "<checkpoint>") -> RobotContract:
    """The robot contract embedded in a loaded checkpoint."""
    return RobotContract.from_dict(data["contract"], where=f"{where}:contract")


# ---------------------------------------------------------------------------------------------
# RNG state in weights_only-safe form
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors/ints/lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda_states])
