"""Replay dataset -> LeRobot v3.0 dataset (``lerobot_export``), written with pyarrow and PyAV.

So LeRobot's own tools (``LeRobotDataset``, the visualiser, other policies' trainers) open what our
recorder and converter captured from ROS. Written by this package, not by the ``lerobot`` package (a
test opens the result with the real ``LeRobotDataset``). Per replay episode, one LeRobot episode:

- ``observation.images.<camera>``: video (mp4, default AV1 as LeRobot records), the stored frames;
- ``observation.state``: float32 ``(S,)`` raw state inputs, when the contract declares them;
- ``action``: float32 ``(D,)`` continuous, contract units, ``names`` = the contract's dim names;
- ``next.reward`` float32, ``next.success`` (True on the last frame of a successful episode),
  ``next.done`` (True on the last frame of a terminal episode), ``next.truncated`` (True on the last
  frame of a truncated one): what ``lerobot_import`` reads back, so ours -> LeRobot -> ours keeps
  actions, state, rewards, terminals and instructions exactly (``--reward next.reward`` on import);
- the task is the instruction (an episode without one gets the empty task ``""``).

The folder is written under a temporary name next to ``--out`` and renamed into place when complete:
a killed export leaves no half dataset, and ``--out`` must not exist yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from q_transformer_ros.data.lerobot_format import (
    DEFAULT_CHUNK_SIZE, INFO_PATH, V30, V30_DATA_PATH, V30_EPISODES_PATH, V30_TASKS_PATH, V30_VIDEO_PATH,
    LeRobotFormatError, _av, _pyarrow,
)
from q_transformer_ros.replay.format import DatasetError
from q_transformer_ros.replay.reader import ReplayReader, StoredEpisode

VCODECS = ("libsvtav1", "libx264", "libx265", "libaom-av1", "libvpx-vp9", "mpeg4")
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}


class LeRobotExportError(ValueError):
    """An export that cannot go on; names the dataset, the output folder or the option."""


@dataclass(frozen=True)
class ExportConfig:
    vcodec: str = "libsvtav1"
    """Video codec (LeRobot records AV1 with libsvtav1; libx264 is h264)."""
    crf: int = 30
    """Constant rate factor: lower is closer to the stored frames (LeRobot's default is 30)."""
    gop: int = 2
    """Keyframe interval in frames (LeRobot's default 2 keeps random access cheap)."""
    episodes_per_file: int = 500
    """Episodes per data parquet / mp4 file (LeRobot starts new files by size; any split is valid)."""
    robot_type: str | None = None
    """``robot_type`` in info.json (default: the contract's name)."""

    def __post_init__(self) -> None:
        if self.vcodec not in VCODECS:
            raise LeRobotExportError(f"--vcodec {self.vcodec!r}: use one of {VCODECS}")
        if not 0 <= self.crf <= 63:
            raise LeRobotExportError(f"--crf {self.crf}: must be in [0, 63]")
        if self.gop < 1 or self.episodes_per_file < 1:
            raise LeRobotExportError("--gop and --episodes-per-file must be >= 1")


@dataclass
class ExportReport:
    dataset: str
    out: str
    episodes: int = 0
    frames: int = 0
    tasks: list[str] = field(default_factory=list)
    video_files: int = 0

    def describe(self) -> str:
        return (f"exported {self.episodes} episode(s), {self.frames} frame(s), {len(self.tasks)} task(s), "
                f"{self.video_files} video file(s) from {self.dataset} to {self.out} (LeRobot {V30})")


# ---------------------------------------------------------------------------------------------
# features and stats
# ---------------------------------------------------------------------------------------------

def camera_key(name: str) -> str:
    return f"observation.images.{name}"


def lerobot_features(reader: ReplayReader, cfg: ExportConfig, fps: float) -> dict[str, dict[str, Any]]:
    """info.json ``features``: cameras as videos, the action vector, reward/done/success/truncated flags."""
    c = reader.contract
    codec_name = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264", "libx265": "hevc",
                  "libvpx-vp9": "vp9", "mpeg4": "mpeg4"}[cfg.vcodec]
    feats: dict[str, dict[str, Any]] = {}
    for cam in c.cameras:
        feats[camera_key(cam.name)] = {
            "dtype": "video", "shape": [cam.height, cam.width, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": cam.height, "video.width": cam.width, "video.codec": codec_name,
                     "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": fps,
                     "video.channels": 3, "has_audio": False},
        }
    if c.state_inputs:
        feats["observation.state"] = {"dtype": "float32", "shape": [c.state_dim], "names": [s.name for s in c.state_inputs]}
    feats["action"] = {"dtype": "float32", "shape": [c.num_action_dims], "names": [d.name for d in c.action_dims]}
    feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    for flag in ("next.done", "next.success", "next.truncated"):
        feats[flag] = {"dtype": "bool", "shape": [1], "names": None}
    feats["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for k in ("frame_index", "episode_index", "index", "task_index"):
        feats[k] = {"dtype": "int64", "shape": [1], "names": None}
    return feats


def _hf_features(features: dict[str, dict[str, Any]]) -> str:
    """The ``huggingface`` schema metadata the ``datasets`` library writes into LeRobot's parquet files."""
    out = {}
    for k, f in features.items():
        if f["dtype"] == "video":
            continue
        if list(f["shape"]) == [1]:
            out[k] = {"dtype": f["dtype"], "_type": "Value"}
        else:
            out[k] = {"feature": {"dtype": f["dtype"], "_type": "Value"}, "length": int(f["shape"][0]), "_type": "List"}
    return json.dumps({"info": {"features": out}})


def _stats(values: np.ndarray, axis: Any) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics (min, max, mean, std, count and quantiles) over ``axis``."""
    v = values.astype(np.float64)
    out = {"min": v.min(axis=axis), "max": v.max(axis=axis), "mean": v.mean(axis=axis), "std": v.std(axis=axis),
           "count": np.array([values.shape[0]], dtype=np.int64)}
    for name, q in QUANTILES.items():
        out[name] = np.quantile(v, q, axis=axis)
    return out


def _episode_stats(ep: StoredEpisode, rows: dict[str, np.ndarray], reader: ReplayReader) -> dict[str, dict[str, np.ndarray]]:
    stats = {}
    for cam in reader.contract.cameras:  # images: per channel over pixels, scaled to [0, 1], shape (3, 1, 1)
        s = _stats(np.asarray(ep.frames[cam.name], dtype=np.float32) / 255.0, axis=(0, 2, 3))
        stats[camera_key(cam.name)] = {k: (v.reshape(3, 1, 1) if k != "count" else v) for k, v in s.items()}
    for k, v in rows.items():
        arr = v if v.ndim == 2 else v[:, None]
        stats[k] = _stats(arr, axis=0)
    return stats


def _aggregate(all_rows: dict[str, list[np.ndarray]], all_frames: dict[str, list[np.ndarray]]) -> dict[str, dict[str, list]]:
    """Dataset statistics (meta/stats.json): every row, and a subsample of at most ~20 frames per episode."""
    out: dict[str, dict[str, list]] = {}
    for k, parts in all_frames.items():
        s = _stats(np.concatenate(parts, axis=0), axis=(0, 2, 3))
        out[k] = {n: (v.reshape(3, 1, 1) if n != "count" else v).tolist() for n, v in s.items()}
    for k, parts in all_rows.items():
        arr = np.concatenate(parts)
        out[k] = {n: v.tolist() for n, v in _stats(arr if arr.ndim == 2 else arr[:, None], axis=0).items()}
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

class _VideoFile:
    """One mp4 file of one camera: episodes appended one after the other (PyAV)."""

    def __init__(self, path: Path, fps: float, width: int, height: int, cfg: ExportConfig):
        av = _av()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        rate = Fraction(fps).limit_denominator(1001)
        options = {"g": str(cfg.gop), "crf": str(cfg.crf)}
        if cfg.vcodec == "libsvtav1":
            options["preset"] = "12"  # fastest; LeRobot leaves the encoder default
        self.stream = self.container.add_stream(cfg.vcodec, rate=rate, options=options)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.time_base = Fraction(1, 1) / rate
        self.frames = 0
        self._av = av

    def write(self, frames_chw: np.ndarray) -> None:
        for img in frames_chw:
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(np.transpose(img, (1, 2, 0))), format="rgb24")
            vf.pts = self.frames
            vf.time_base = self.time_base
            self.container.mux(self.stream.encode(vf))
            self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def _write_parquet(path: Path, columns: dict[str, Any], metadata: dict[bytes, bytes] | None = None) -> None:
    import pyarrow as pa

    pq = _pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


def _vector_column(values: np.ndarray) -> Any:
    """float (T, D) -> a fixed-size-list column (what ``datasets`` writes for a (D,) feature)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def _tasks_table(tasks: list[str]) -> tuple[dict[str, Any], dict[bytes, bytes]]:
    """meta/tasks.parquet as pandas writes it: column task_index, the task text as the frame's index."""
    import pyarrow as pa

    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0",
    }
    cols = {"task_index": pa.array(range(len(tasks)), type=pa.int64()), "__index_level_0__": pa.array(tasks, type=pa.string())}
    return cols, {b"pandas": json.dumps(pandas_meta).encode()}


def export_lerobot(dataset: str | Path, out: str | Path, cfg: ExportConfig = ExportConfig()) -> ExportReport:
    """Write the replay dataset at ``dataset`` as a LeRobot v3.0 dataset folder ``out`` (must not exist)."""
    import pyarrow as pa

    out = Path(out)
    if out.exists():
        raise LeRobotExportError(f"{out}: already exists; choose a new --out (an export is never merged into a folder)")
    reader = ReplayReader(dataset)
    c = reader.contract
    if reader.num_episodes == 0:
        raise LeRobotExportError(f"{dataset}: the dataset has no episodes")
    for cam in c.cameras:
        if cam.height % 2 or cam.width % 2:
            raise LeRobotExportError(f"camera '{cam.name}' is {cam.width}x{cam.height}: yuv420p video needs even sizes")
        if cfg.vcodec == "libsvtav1" and min(cam.height, cam.width) < 32:
            raise LeRobotExportError(f"camera '{cam.name}' is {cam.width}x{cam.height}: libsvtav1 needs at least 32x32 "
                                     f"(it crashes below); use --vcodec libx264 or mpeg4")
    fps = float(c.control_rate_hz)
    features = lerobot_features(reader, cfg, fps)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    report = ExportReport(dataset=str(dataset), out=str(out))
    try:
        tasks: list[str] = []
        hf_meta = {b"huggingface": _hf_features(features).encode()}
        episode_rows: dict[str, list[Any]] = {k: [] for k in (
            "episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
            "dataset_to_index")}
        for cam in c.cameras:
            for s in ("chunk_index", "file_index", "from_timestamp", "to_timestamp"):
                episode_rows[f"videos/{camera_key(cam.name)}/{s}"] = []
        ep_stats: list[dict[str, dict[str, np.ndarray]]] = []
        all_rows: dict[str, list[np.ndarray]] = {}
        all_frames: dict[str, list[np.ndarray]] = {camera_key(cam.name): [] for cam in c.cameras}
        index = 0
        n = reader.num_episodes
        for g, start in enumerate(range(0, n, cfg.episodes_per_file)):
            chunk, file = divmod(g, DEFAULT_CHUNK_SIZE)
            videos = {cam.name: _VideoFile(tmp / V30_VIDEO_PATH.format(video_key=camera_key(cam.name), chunk_index=chunk,
                                                                       file_index=file), fps, cam.width, cam.height, cfg)
                      for cam in c.cameras}
            report.video_files += len(videos)
            data: dict[str, list[np.ndarray]] = {}
            for e in range(start, min(n, start + cfg.episodes_per_file)):
                ep = reader.episode(e)
                T = ep.length
                task = ep.instruction if ep.instruction is not None else ""
                if task not in tasks:
                    tasks.append(task)
                last = np.zeros(T, dtype=bool)
                last[-1] = True
                rows = {} if ep.state is None else {"observation.state": np.asarray(ep.state, dtype=np.float32)}
                rows |= {
                    "action": np.asarray(ep.actions, dtype=np.float32),
                    "next.reward": np.asarray(ep.rewards, dtype=np.float32),
                    "next.done": np.asarray(ep.terminals, dtype=bool),
                    "next.success": last & bool(ep.entry.success),
                    "next.truncated": np.asarray(ep.truncated, dtype=bool),
                    "timestamp": (np.arange(T) / fps).astype(np.float32),
                    "frame_index": np.arange(T, dtype=np.int64),
                    "episode_index": np.full(T, e, dtype=np.int64),
                    "index": np.arange(index, index + T, dtype=np.int64),
                    "task_index": np.full(T, tasks.index(task), dtype=np.int64),
                }
                for k, v in rows.items():
                    data.setdefault(k, []).append(v)
                    all_rows.setdefault(k, []).append(v)
                for cam in c.cameras:
                    vf = videos[cam.name]
                    t0 = vf.frames / fps
                    vf.write(np.asarray(ep.frames[cam.name]))
                    key = camera_key(cam.name)
                    episode_rows[f"videos/{key}/chunk_index"].append(chunk)
                    episode_rows[f"videos/{key}/file_index"].append(file)
                    episode_rows[f"videos/{key}/from_timestamp"].append(t0)
                    episode_rows[f"videos/{key}/to_timestamp"].append(vf.frames / fps)
                    all_frames[key].append(np.asarray(ep.frames[cam.name])[:: max(1, T // 20)])
                for k, v in (("episode_index", e), ("tasks", [task]), ("length", T), ("data/chunk_index", chunk),
                             ("data/file_index", file), ("dataset_from_index", index), ("dataset_to_index", index + T)):
                    episode_rows[k].append(v)
                ep_stats.append(_episode_stats(ep, rows, reader))
                index += T
                report.episodes += 1
                report.frames += T
            for vf in videos.values():
                vf.close()
            cols = {}
            for k, parts in data.items():
                arr = np.concatenate(parts)
                cols[k] = _vector_column(arr) if arr.ndim == 2 else pa.array(arr)
            _write_parquet(tmp / V30_DATA_PATH.format(chunk_index=chunk, file_index=file), cols, hf_meta)
        # meta/episodes: the location columns, then per-episode stats, then its own location
        ep_cols: dict[str, Any] = {k: pa.array(v) for k, v in episode_rows.items()}
        for key in ep_stats[0]:
            for stat in ep_stats[0][key]:
                ep_cols[f"stats/{key}/{stat}"] = pa.array([s[key][stat].tolist() for s in ep_stats])
        ep_cols["meta/episodes/chunk_index"] = pa.array(np.zeros(n, np.int64))
        ep_cols["meta/episodes/file_index"] = pa.array(np.zeros(n, np.int64))
        _write_parquet(tmp / V30_EPISODES_PATH.format(chunk_index=0, file_index=0), ep_cols)
        tcols, tmeta = _tasks_table(tasks)
        _write_parquet(tmp / V30_TASKS_PATH, tcols, tmeta)
        (tmp / "meta" / "stats.json").write_text(json.dumps(_aggregate(all_rows, all_frames), indent=1))
        info = {
            "codebase_version": V30, "robot_type": cfg.robot_type or c.name, "total_episodes": n,
            "total_frames": index, "total_tasks": len(tasks), "chunks_size": DEFAULT_CHUNK_SIZE,
            "data_files_size_in_mb": 100, "video_files_size_in_mb": 200, "fps": fps if fps % 1 else int(fps),
            "splits": {"train": f"0:{n}"}, "data_path": V30_DATA_PATH, "video_path": V30_VIDEO_PATH,
            "features": features,
        }
        (tmp / INFO_PATH).write_text(json.dumps(info, indent=4))
        report.tasks = tasks
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lerobot_export",
        description="Write a Q-Transformer replay dataset as a LeRobot v3.0 dataset folder (parquet + mp4), "
                    "for LeRobot's tools, visualiser and policies. Import it back with lerobot_import.",
    )
    p.add_argument("dataset", type=Path, help="replay dataset folder (with manifest.json)")
    p.add_argument("--out", required=True, type=Path, help="LeRobot dataset folder to create (must not exist)")
    p.add_argument("--vcodec", choices=VCODECS, default="libsvtav1", help="video codec (default libsvtav1, AV1)")
    p.add_argument("--crf", type=int, default=30, help="video quality: lower is closer to the frames (default 30)")
    p.add_argument("--gop", type=int, default=2, help="keyframe interval in frames (default 2)")
    p.add_argument("--episodes-per-file", type=int, default=500, help="episodes per parquet/mp4 file (default 500)")
    p.add_argument("--robot-type", help="robot_type in info.json (default: the contract's name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lerobot_export`` entry point; returns the exit status (0 ok, 1 error)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only (it prints its whole configuration otherwise)
    try:
        cfg = ExportConfig(vcodec=args.vcodec, crf=args.crf, gop=args.gop, episodes_per_file=args.episodes_per_file,
                           robot_type=args.robot_type)
        report = export_lerobot(args.dataset, args.out, cfg)
    except (LeRobotExportError, LeRobotFormatError, DatasetError) as e:
        print(f"lerobot_export: error: {e}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
