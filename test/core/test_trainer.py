"""The `train` executable end to end on small real datasets: outputs, exact resume, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from q_transformer_ros.core import trainer as trainer_mod
from q_transformer_ros.core.checkpoint import load_checkpoint
from q_transformer_ros.replay import ReplayWriter
from q_transformer_ros.replay.testing import random_episode, tiny_contract
from q_transformer_ros.core.metrics import read_metrics
from q_transformer_ros.core.trainer import TrainConfig, TrainError, config_from_args, main, train

REPO = Path(__file__).resolve().parents[2]
TINY_YAML = REPO / "config" / "train_tiny.yaml"
# a smaller network than the tiny preset: 16 px images, one MaxViT stage
SMALL_MODEL = ["--set", "model_overrides.depth=[1]", "--set", "model_overrides.window_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread for tiny models


def make_dataset(path: Path, episodes: int = 6, length: int = 6, seed: int = 0, **contract_kw) -> Path:
    kw = dict(size=16, num_dims=3, bins=8, frame_history=2)
    kw.update(contract_kw)
    contract = tiny_contract(**kw)
    rng = np.random.default_rng(seed)
    instructions = ["pick the cube", "open the drawer", None]
    with ReplayWriter(path, contract) as w:
        w.add_episodes([random_episode(contract, length, rng, success=bool(i % 2), instruction=instructions[i % 3],
                                       source_id=f"ep{i}") for i in range(episodes)])
    return path


def args(ds: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_YAML), "--dataset", str(ds), "--out", str(out), "--no-progress", *SMALL_MODEL, *extra]


def tensorboard_scalars(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar as TensorBoard itself reads the run's event files (purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(key)]


def test_train_writes_checkpoint_metrics_plot(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    rc = main(args(ds, out, "--steps", "4", "--batch-size", "8", "--set", "log_every=1", "--set", "checkpoint_every=2",
                   "--set", "model_overrides.dual_critics=true"))
    assert rc == 0, capsys.readouterr().err
    ck = load_checkpoint(out / "checkpoint.pt")
    for key in ("format_version", "kind", "contract", "model_config", "text_encoder", "objective", "model", "target_model",
                "optimizer", "scheduler", "step", "rng", "data_order", "instruction_embeddings", "train_config"):
        assert key in ck, key
    assert ck["step"] == 4 and ck["kind"] == "q_transformer_ros/checkpoint"
    assert ck["data_order"]["consumed_batches"] == 4
    assert ck["instruction_embeddings"]["texts"] == ["pick the cube", "open the drawer"]
    assert ck["instruction_embeddings"]["embeddings"].shape == (2, 32)
    assert ck["model_config"]["dual_critics"] is True
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("losses/td_loss", "losses/conservative_loss", "q/mean_q", "q/mean_target", "grad_norm",
                "charts/samples_per_s", "lr"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert (out / "metrics.png").stat().st_size > 1000
    # TensorBoard reads the same scalars under the same keys
    for key in ("losses/td_loss", "q/mean_q", "lr", "charts/samples_per_s"):
        got = tensorboard_scalars(out, key)
        assert [s for s, _ in got] == [1, 2, 3, 4], key
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in records], rtol=1e-6, err_msg=key)
    # warm-up: lr rises over the first steps
    assert records[0]["lr"] < records[2]["lr"]
    # text embeddings were cached in the dataset for the next run
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["text_embeddings"]


def test_no_tensorboard_writes_no_event_files(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    res = train(config_from_args(args(ds, tmp_path / "r", "--steps", "2", "--batch-size", "8", "--no-tensorboard")))
    assert res.metrics.is_file()
    assert not list((tmp_path / "r").glob("events.out.tfevents.*"))


def test_behaviour_cloning_objective(tmp_path):
    ds = make_dataset(tmp_path / "ds")
    cfg = config_from_args(args(ds, tmp_path / "bc", "--steps", "3", "--batch-size", "8", "--objective", "bc",
                                "--set", "log_every=1"))
    res = train(cfg)
    assert res.step == 3
    assert "losses/bc_loss" in res.last_metrics and "bc/accuracy" in res.last_metrics
    assert load_checkpoint(res.checkpoint)["target_model"] is None


class Killed(Exception):
    pass


def _params(path: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(path)
    out = {f"model.{k}": v for k, v in ck["model"].items()}
    out.update({f"target.{k}": v for k, v in ck["target_model"].items()})
    for i, st in ck["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def test_killed_run_resumes_to_identical_parameters(tmp_path, monkeypatch):
    """N steps straight == k steps, kill, resume, N - k steps (every parameter and optimizer moment equal).

    Dropout, instruction dropout and an epoch boundary inside the run make RNG and data-order state matter;
    the straight run uses a worker process, the killed/resumed one none (the data order must not care)."""
    ds = make_dataset(tmp_path / "ds", episodes=6, length=5)  # 24 samples: 3 batches of 8 per epoch
    common = ["--steps", "7", "--batch-size", "8", "--set", "checkpoint_every=3", "--set", "log_every=1",
              "--set", "cond_drop_prob=0.5", "--set", "model_overrides.dropout=0.2", "--set", "warmup_steps=2"]
    straight = train(config_from_args(args(ds, tmp_path / "a", *common, "--num-workers", "1")))

    real_step = trainer_mod.learning_step
    calls = {"n": 0}

    def dying_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the checkpoint at step 3
            raise Killed()
        return real_step(*a, **kw)

    monkeypatch.setattr(trainer_mod, "learning_step", dying_step)
    with pytest.raises(Killed):
        train(config_from_args(args(ds, tmp_path / "b", *common)))
    monkeypatch.setattr(trainer_mod, "learning_step", real_step)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    resumed = train(config_from_args(args(ds, tmp_path / "b", *common, "--resume")))
    assert resumed.step == straight.step == 7

    a, b = _params(straight.checkpoint), _params(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == list(range(1, 8))
    # TensorBoard too: the killed run's step 4 was purged, the resumed run's steps 4..7 kept, once each
    tb = tensorboard_scalars(tmp_path / "b", "losses/loss")
    assert [s for s, _ in tb] == list(range(1, 8))
    np.testing.assert_allclose([v for _, v in tb], [v for _, v in tensorboard_scalars(tmp_path / "a", "losses/loss")],
                               rtol=1e-6)
    # and the run did learn something: parameters moved from their init
    assert resumed.param_checksum != pytest.approx(0.0)


# ----------------------------------------------------------------------------------- bad input

def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_missing_dataset_path(tmp_path, capsys):
    err = _err(capsys, args(tmp_path / "nope", tmp_path / "out", "--steps", "1"))
    assert "nope" in err and "does not exist" in err


def test_no_dataset_given(tmp_path, capsys):
    err = _err(capsys, ["--config", str(TINY_YAML), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert "--dataset" in err


def test_empty_dataset(tmp_path, capsys):
    ReplayWriter(tmp_path / "empty", tiny_contract(size=16)).close()
    err = _err(capsys, args(tmp_path / "empty", tmp_path / "out", "--steps", "1"))
    assert "empty" in err and str(tmp_path / "empty") in err


def test_dataset_from_a_different_contract(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    other = tiny_contract(size=16, num_dims=2, name="other_robot")
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other.to_dict()))
    err = _err(capsys, args(ds, tmp_path / "out", "--steps", "1", "--contract", str(path)))
    assert str(ds) in err and "action dims differ" in err


def test_nan_loss_names_the_step(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    chunk = next((ds / "chunks").iterdir())
    rewards = np.load(chunk / "rewards.npy")
    rewards[:] = np.nan  # a corrupted file (the writer itself rejects NaN rewards)
    np.save(chunk / "rewards.npy", rewards)
    err = _err(capsys, args(ds, tmp_path / "out", "--steps", "3", "--batch-size", "8"))
    assert "non-finite loss" in err and "at step 1" in err


def test_unknown_config_key_and_bad_value(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    assert "unknown key 'bogus'" in _err(capsys, args(ds, tmp_path / "o", "--set", "bogus=1"))
    assert "TrainConfig.batch_size" in _err(capsys, args(ds, tmp_path / "o", "--batch-size", "0"))
    assert "td_loss" in _err(capsys, args(ds, tmp_path / "o", "--steps", "1", "--set", "learner.td_loss=huber"))


def test_resume_required_but_absent(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds")
    err = _err(capsys, args(ds, tmp_path / "fresh", "--steps", "1", "--resume"))
    assert "checkpoint.pt" in err and "does not exist" in err


def test_config_yaml_and_overrides():
    cfg = config_from_args(["--config", str(TINY_YAML), "--dataset", "d1", "--dataset", "d2", "--steps", "9",
                            "--set", "learner.td_loss=bce", "--set", "model_overrides.dual_critics=true"])
    assert cfg.dataset == ["d1", "d2"] and cfg.steps == 9
    assert cfg.learner["td_loss"] == "bce" and cfg.learner["target_update"] == "ema"
    assert cfg.model_overrides["dual_critics"] is True and cfg.model_overrides["dim"] == 8
    base = yaml.safe_load((REPO / "config" / "train_base.yaml").read_text())
    TrainConfig.from_dict(base)  # the shipped GPU config is valid


def test_exponent_floats_are_numbers(tmp_path):
    """``--set lr=1e-4`` (the trainer's own docstring example) and ``lr: 3e-5`` in a config file are floats;
    PyYAML alone reads them as strings (YAML 1.1)."""
    config = tmp_path / "train.yaml"
    config.write_text("lr: 3e-5\nweight_decay: 1E-2\n")
    cfg = config_from_args(["--config", str(config), "--dataset", "d", "--set", "learner.target_ema_tau=5e-3"])
    assert cfg.lr == 3e-5 and cfg.weight_decay == 0.01 and cfg.learner["target_ema_tau"] == 0.005
    assert config_from_args(["--dataset", "d", "--set", "lr=1e-4"]).lr == 1e-4


def test_several_datasets_merge_instruction_tables(tmp_path):
    from q_transformer_ros.core.replay_dataset import ReplayDataset
    from q_transformer_ros.core.trainer import BatchDataset

    contract = tiny_contract(size=16, num_dims=3, bins=8, frame_history=2)
    rng = np.random.default_rng(0)
    for name, texts in (("d1", ["open", "close"]), ("d2", ["close", None, "push"])):
        with ReplayWriter(tmp_path / name, contract) as w:
            w.add_episodes([random_episode(contract, 3, rng, instruction=t, source_id=f"{name}{i}")
                            for i, t in enumerate(texts)])
    d1, d2 = ReplayDataset(tmp_path / "d1"), ReplayDataset(tmp_path / "d2")
    data = BatchDataset([d1, d2])
    assert data.instructions == ["open", "close", "push"] and len(data) == len(d1) + len(d2)
    idx = list(range(len(data)))[::-1]  # both datasets, out of order
    batch = data[idx]
    texts = [None if i < 0 else data.instructions[i] for i in batch.instruction_index.tolist()]
    want = []
    for i in idx:
        ds, j = (d1, i) if i < len(d1) else (d2, i - len(d1))
        k = int(ds[j]["instruction_index"])
        want.append(None if k < 0 else ds.instructions[k])
    assert texts == want
    torch.testing.assert_close(batch.frames[-1], d1[0]["frames"])


# ------------------------------------------------------------------------------ integrity

def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def _trained(tmp_path: Path, steps: int = 2) -> tuple[Path, Path]:
    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    assert main(args(ds, out, "--steps", str(steps), "--batch-size", "4")) == 0
    return ds, out


def test_corrupt_empty_and_truncated_checkpoints_are_refused_everywhere(tmp_path, capsys):
    """64 flipped bytes, 0 bytes, half a file: a CheckpointError naming the file from the loader, the
    policy and the trainer (which must not resume from it, nor save over it)."""
    from q_transformer_ros.core.checkpoint import CheckpointError
    from q_transformer_ros.core.policy import QTransformerPolicy

    ds, out = _trained(tmp_path)
    ckpt = out / "checkpoint.pt"
    good = ckpt.read_bytes()
    cases = {"flipped": lambda: _flip_middle(ckpt), "empty": lambda: ckpt.write_bytes(b""),
             "truncated": lambda: ckpt.write_bytes(good[: len(good) // 2])}
    for name, damage in cases.items():
        ckpt.write_bytes(good)
        damage()
        damaged = ckpt.read_bytes()
        with pytest.raises(CheckpointError, match=str(ckpt)) as e:
            load_checkpoint(ckpt)
        assert "IndexError" not in str(e.value), name
        with pytest.raises(CheckpointError, match=str(ckpt)):
            QTransformerPolicy.from_checkpoint(ckpt, device="cpu")
        err = _err(capsys, args(ds, out, "--steps", "4", "--batch-size", "4"))
        assert "cannot resume" in err and str(ckpt) in err, name
        assert ckpt.read_bytes() == damaged, f"{name}: the trainer wrote over the damaged checkpoint"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_flips_in_tensor_data_and_in_the_pickle_are_both_caught(tmp_path):
    """A flip inside a weight tensor (zip CRC and payload sha256) and inside the pickled structure."""
    import zipfile

    from q_transformer_ros.core.checkpoint import CheckpointError

    _, out = _trained(tmp_path)
    good = (out / "checkpoint.pt").read_bytes()
    with zipfile.ZipFile(out / "checkpoint.pt") as z:
        infos = {i.filename: i for i in z.infolist()}
    tensor = max((i for n, i in infos.items() if "/data/" in n), key=lambda i: i.file_size)
    pkl = next(i for n, i in infos.items() if n.endswith("data.pkl"))
    for info in (tensor, pkl):
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data = bytearray(good)
        data[start + info.file_size // 2] ^= 0x01  # one bit
        path = _write(tmp_path / f"bad_{info.filename.replace('/', '_')}.pt", bytes(data))
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(path)


def test_two_trainers_on_one_out_the_second_is_refused(tmp_path, capsys):
    from q_transformer_ros.core.run_lock import RunLock

    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    with RunLock(out):  # another run holds the folder (flock: another open file description)
        err = _err(capsys, args(ds, out, "--steps", "2", "--batch-size", "4"))
    assert "another training run is using this output folder" in err and f"pid {__import__('os').getpid()}" in err
    assert not (out / "checkpoint.pt").exists()
    assert main(args(ds, out, "--steps", "2", "--batch-size", "4")) == 0  # free again


def test_kill_during_a_later_checkpoint_write_keeps_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing the second checkpoint (a real process, killed for real): the first
    checkpoint.pt stays intact, the rerun removes the half-written temp file and resumes from it."""
    import subprocess
    import sys

    ds = make_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    argv = args(ds, out, "--steps", "6", "--batch-size", "4", "--set", "checkpoint_every=2")
    script = f"""
import os, signal, sys
import torch
from q_transformer_ros.core import checkpoint
real_save, calls = torch.save, [0]
def dying_save(obj, f, *a, **k):
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint: write part of it, then die
        f.write(b"PK\\x03\\x04" + os.urandom(4096)); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
checkpoint.torch.save = dying_save
from q_transformer_ros.core.trainer import main
torch.set_num_threads(1)
sys.exit(main({argv!r}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    temps = list(out.glob(".checkpoint.pt.tmp-*"))
    assert temps, "the killed write left no temp file: the test did not kill mid-write"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    result = train(config_from_args(argv))
    assert result.step == 6 and not list(out.glob(".checkpoint.pt.tmp-*"))


def test_discount_override_trains_with_its_own_returns(tmp_path):
    """--set discount=... reads the data with that gamma (returns, bootstraps) and says so in the
    checkpoint's learner config; the checkpoint's contract keeps the robot's own value."""
    ds = make_dataset(tmp_path / "ds", discount=0.9)
    res = train(config_from_args(args(ds, tmp_path / "r", "--steps", "2", "--batch-size", "8", "--set", "discount=0.5")))
    ck = load_checkpoint(res.checkpoint)
    assert ck["learner_config"]["discount"] == 0.5
    assert ck["contract"]["discount"] == 0.9
    with pytest.raises(TrainError, match="discount"):
        config_from_args(args(ds, tmp_path / "r2", "--set", "discount=1.5"))


def test_busy_cores_counts_other_processes_now_not_this_one(tmp_path):
    """Another process spinning on a core is seen within half a second; this process's own work is not
    counted; a missing /proc gives None (auto_threads then falls back to the load average)."""
    import subprocess
    import sys

    from q_transformer_ros.core.trainer import busy_cores

    assert busy_cores(stat=tmp_path / "no_such_stat") is None
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert seen is not None and seen >= 0.7, seen
    # this process busy itself (a thread spinning while we measure) is not "other processes"
    import threading
    stop = time.monotonic() + 0.8
    worker = threading.Thread(target=lambda: [None for _ in iter(lambda: time.monotonic() < stop, False)])
    worker.start()
    own = busy_cores(0.5)
    worker.join()
    assert own is not None and own < seen - 0.5, (own, seen)


def test_auto_threads_leave_the_busy_cores_alone():
    from q_transformer_ros.core.trainer import auto_threads

    assert auto_threads(cores=2, load=0.1) == 2
    assert auto_threads(cores=2, load=1.2) == 1   # another process holds a core: 1 thread
    assert auto_threads(cores=2, load=5.0) == 1   # never 0
    assert auto_threads(cores=16, load=3.4) == 13
