"""The LeRobot dataset layout (v2.1 and v3.0), read with pyarrow, json and PyAV (no ``lerobot`` package).

Why a module of its own: the importer (``lerobot_import``) and the exporter (``lerobot_export``) must
agree with LeRobot on file names, tables and timestamps, and that agreement lives here. Only local
folders are read (no hub access). pyarrow and av are imported when first needed, so the rest of the
package imports without them (``pip install q_transformer_ros[lerobot]`` brings them).

v3.0 (lerobot >= 0.4)::

    meta/info.json                                   codebase_version, fps, features, path templates
    meta/tasks.parquet                               task_index, index = the task text (pandas index)
    meta/episodes/chunk-XXX/file-XXX.parquet         one row per episode: episode_index, tasks, length,
                                                     data/{chunk,file}_index, dataset_{from,to}_index,
                                                     videos/<key>/{chunk_index,file_index,from_timestamp,to_timestamp}
    data/chunk-XXX/file-XXX.parquet                  one row per frame, many episodes per file
    videos/<key>/chunk-XXX/file-XXX.mp4              many episodes per file, one after the other

v2.1 (lerobot 0.1 - 0.3)::

    meta/info.json, meta/tasks.jsonl (task_index, task), meta/episodes.jsonl (episode_index, tasks, length)
    data/chunk-XXX/episode_XXXXXX.parquet            one file per episode
    videos/chunk-XXX/<key>/episode_XXXXXX.mp4        one file per episode, starting at t = 0

A frame row has the feature columns plus ``timestamp`` (seconds from the episode start),
``frame_index``, ``episode_index``, ``index`` (global) and ``task_index``. Video frames are found by
timestamp: ``from_timestamp + timestamp`` in the episode's mp4 file.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

V21 = "v2.1"
V30 = "v3.0"
SUPPORTED_VERSIONS = (V21, V30)
INFO_PATH = "meta/info.json"
V30_TASKS_PATH = "meta/tasks.parquet"
V30_EPISODES_DIR = "meta/episodes"
V30_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V30_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V30_EPISODES_PATH = V30_EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V21_TASKS_PATH = "meta/tasks.jsonl"
V21_EPISODES_PATH = "meta/episodes.jsonl"
DEFAULT_CHUNK_SIZE = 1000
FRAME_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
"""Columns every frame row has besides the features (LeRobot's DEFAULT_FEATURES)."""


class LeRobotFormatError(ValueError):
    """A LeRobot dataset that cannot be read; the message names the file and the field."""


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError as e:
        raise LeRobotFormatError(f"reading LeRobot datasets needs pyarrow ({e}); pip install -r requirements/lerobot.txt "
                                 f"(or q_transformer_ros[lerobot])") from None
    return pq


def _av() -> Any:
    try:
        import av
    except ImportError as e:
        raise LeRobotFormatError(f"LeRobot videos need PyAV ({e}); pip install -r requirements/lerobot.txt "
                                 f"(or q_transformer_ros[lerobot])") from None
    return av


@dataclass(frozen=True)
class VideoSegment:
    """Where one episode's frames of one video feature lie."""

    path: Path
    from_timestamp: float
    """Start of the episode in the file (0 for v2.1's one file per episode)."""
    to_timestamp: float | None = None


@dataclass(frozen=True)
class EpisodeRef:
    """One episode of a LeRobot dataset and where its rows and videos are."""

    index: int
    """``episode_index``."""
    length: int
    tasks: tuple[str, ...]
    data_path: Path
    rows: tuple[int, int] | None
    """Global ``[index from, to)`` of its rows in a v3.0 data file shared by several episodes; None for
    v2.1 (the file holds only this episode)."""
    videos: dict[str, VideoSegment] = field(default_factory=dict)


@dataclass
class LeRobotLayout:
    """A local LeRobot dataset folder: info.json, tasks, episodes and file paths (either version)."""

    root: Path
    info: dict[str, Any]
    version: str
    fps: float
    features: dict[str, dict[str, Any]]
    tasks: dict[int, str]
    episodes: list[EpisodeRef]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") == "image"]

    def where(self, rel: str | Path = INFO_PATH) -> str:
        return str(self.root / rel)

    def feature(self, key: str, role: str) -> dict[str, Any]:
        """The feature ``key`` of info.json; the error names the file, the role and the features there are."""
        if key not in self.features:
            raise LeRobotFormatError(f"{self.where()}: {role}: feature '{key}' is not in 'features'; the dataset has "
                                     f"{sorted(self.features)}")
        return self.features[key]

    def read_rows(self, ep: EpisodeRef, columns: list[str]) -> dict[str, Any]:
        """The episode's rows of ``columns`` (sorted by frame_index) as pyarrow arrays / python lists."""
        pq = _pyarrow()
        try:
            schema_names = pq.read_schema(ep.data_path).names
        except Exception as e:  # OSError for a missing file, pyarrow's ArrowInvalid for one that is not parquet
            raise LeRobotFormatError(f"{ep.data_path}: cannot read parquet: {e}") from None
        missing = [c for c in columns if c not in schema_names]
        if missing:
            raise LeRobotFormatError(f"{ep.data_path}: column(s) {missing} missing (episode {ep.index}); the file has "
                                     f"{schema_names}")
        want = list(dict.fromkeys(columns + ["episode_index", "frame_index"]))
        table = pq.read_table(ep.data_path, columns=want, filters=[("episode_index", "=", ep.index)])
        order = np.argsort(np.asarray(table.column("frame_index").to_numpy()), kind="stable")
        table = table.take(order)
        if table.num_rows != ep.length:
            raise LeRobotFormatError(f"{ep.data_path}: episode {ep.index} has {table.num_rows} rows, its episode entry "
                                     f"says length {ep.length}")
        return {c: table.column(c) for c in columns}


def column_array(col: Any, path: Path, name: str, dtype: Any, width: int | None = None) -> np.ndarray:
    """A pyarrow column of scalars or fixed-size lists -> numpy ``(T,)`` or ``(T, width)``."""
    try:
        values = col.to_pylist()
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise LeRobotFormatError(f"{path}: column '{name}': cannot read as {np.dtype(dtype).name}: {e}") from None
    if arr.ndim == 2 and arr.shape[1] == 1 and width is None:
        arr = arr[:, 0]
    if width is None and arr.ndim != 1:
        raise LeRobotFormatError(f"{path}: column '{name}' has shape {arr.shape[1:]} per frame, expected a scalar")
    if width is not None and (arr.ndim != 2 or arr.shape[1] != width):
        per = arr.shape[1:] if arr.ndim > 1 else "a scalar"
        raise LeRobotFormatError(f"{path}: column '{name}' has shape {per} per frame, expected ({width},)")
    return arr


def decode_image_cell(cell: Any, path: Path, name: str, row: int) -> np.ndarray:
    """An image column's cell (HF datasets Image: {bytes, path}) -> uint8 (h, w, 3) RGB."""
    from PIL import Image as PILImage

    data = cell.get("bytes") if isinstance(cell, dict) else cell
    src = None
    if not data and isinstance(cell, dict) and cell.get("path"):
        src = Path(cell["path"])
        src = src if src.is_absolute() else path.parent / src
    try:
        img = PILImage.open(src if src is not None else io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises several types for corrupt data
        raise LeRobotFormatError(f"{path}: column '{name}' row {row}: cannot decode the image: {e}") from None
    return np.asarray(img.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# opening a dataset
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing (not a LeRobot dataset folder?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LeRobotFormatError(f"{path}: cannot read JSON: {e}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise LeRobotFormatError(f"{path}: missing (a v2.1 dataset has it)") from None
    out = []
    for i, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise LeRobotFormatError(f"{path}:{i}: not valid JSON: {e}") from None
    return out


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise LeRobotFormatError(f"{where}: field '{key}' missing")
    return d[key]


def open_lerobot(path: str | Path) -> LeRobotLayout:
    """Read ``meta/`` of a local LeRobot dataset (v2.1 or v3.0) and locate every episode's rows and videos."""
    root = Path(path)
    info_path = root / INFO_PATH
    info = _read_json(info_path)
    where = str(info_path)
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{where}: expected a JSON object")
    version = str(_need(info, "codebase_version", where))
    if version not in SUPPORTED_VERSIONS:
        raise LeRobotFormatError(f"{where}: 'codebase_version' = {version!r}: this reader supports {SUPPORTED_VERSIONS}")
    fps = float(_need(info, "fps", where))
    if not fps > 0:
        raise LeRobotFormatError(f"{where}: 'fps' = {fps!r}: must be > 0")
    features = _need(info, "features", where)
    if not isinstance(features, dict):
        raise LeRobotFormatError(f"{where}: 'features' must be an object")
    reader = _open_v30 if version == V30 else _open_v21
    tasks, episodes = reader(root, info, features)
    return LeRobotLayout(root=root, info=info, version=version, fps=fps, features=features, tasks=tasks,
                         episodes=sorted(episodes, key=lambda e: e.index))


def _open_v21(root: Path, info: dict[str, Any], features: dict[str, Any]) -> tuple[dict[int, str], list[EpisodeRef]]:
    where = str(root / INFO_PATH)
    data_tpl = str(_need(info, "data_path", where))
    video_tpl = info.get("video_path")
    chunk_size = int(info.get("chunks_size", DEFAULT_CHUNK_SIZE))
    tasks_path = root / V21_TASKS_PATH
    tasks = {}
    for i, t in enumerate(_read_jsonl(tasks_path)):
        tasks[int(_need(t, "task_index", f"{tasks_path}:{i + 1}"))] = str(_need(t, "task", f"{tasks_path}:{i + 1}"))
    eps_path = root / V21_EPISODES_PATH
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
    if video_keys and not video_tpl:
        raise LeRobotFormatError(f"{where}: field 'video_path' missing but features {video_keys} are videos")
    episodes = []
    for i, e in enumerate(_read_jsonl(eps_path)):
        w = f"{eps_path}:{i + 1}"
        idx = int(_need(e, "episode_index", w))
        chunk = idx // chunk_size
        data = root / data_tpl.format(episode_chunk=chunk, episode_index=idx)
        videos = {k: VideoSegment(root / str(video_tpl).format(episode_chunk=chunk, video_key=k, episode_index=idx), 0.0)
                  for k in video_keys}
        episodes.append(EpisodeRef(index=idx, length=int(_need(e, "length", w)),
                                   tasks=tuple(str(t) for t in e.get("tasks", ())), data_path=data, rows=None,
                                   videos=videos))
    return tasks, episodes


def _open_v30(root: Path, info: dict[str, Any], features: dict[str, Any]) -> tuple[dict[int, str], list[EpisodeRef]]:
    pq = _pyarrow()
    where = str(root / INFO_PATH)
    data_tpl = str(info.get("data_path", V30_DATA_PATH))
    video_tpl = str(info.get("video_path") or V30_VIDEO_PATH)
    tasks_path = root / V30_TASKS_PATH
    if not tasks_path.is_file():
        raise LeRobotFormatError(f"{tasks_path}: missing (a v3.0 dataset has it)")
    table = pq.read_table(tasks_path)
    names = table.schema.names
    if "task_index" not in names:
        raise LeRobotFormatError(f"{tasks_path}: column 'task_index' missing; the file has {names}")
    text_col = "task" if "task" in names else next((n for n in names if n.startswith("__index_level_")), None)
    if text_col is None:
        raise LeRobotFormatError(f"{tasks_path}: no task text (a 'task' column or the pandas index); columns {names}")
    tasks = {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist())}
    ep_files = sorted((root / V30_EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not ep_files:
        raise LeRobotFormatError(f"{root / V30_EPISODES_DIR}: no chunk-XXX/file-XXX.parquet (a v3.0 dataset has them)")
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
    episodes = []
    for f in ep_files:
        names = [n for n in pq.read_schema(f).names if not n.startswith("stats/")]  # per-episode stats: not needed
        rows = pq.read_table(f, columns=names).to_pylist()
        for r in rows:
            w = f"{f} (episode row {r.get('episode_index')})"
            idx = int(_need(r, "episode_index", w))
            data = root / data_tpl.format(chunk_index=int(_need(r, "data/chunk_index", w)),
                                          file_index=int(_need(r, "data/file_index", w)))
            videos = {}
            for k in video_keys:
                p = root / video_tpl.format(video_key=k, chunk_index=int(_need(r, f"videos/{k}/chunk_index", w)),
                                            file_index=int(_need(r, f"videos/{k}/file_index", w)))
                videos[k] = VideoSegment(p, float(_need(r, f"videos/{k}/from_timestamp", w)),
                                         float(r.get(f"videos/{k}/to_timestamp") or 0.0) or None)
            episodes.append(EpisodeRef(
                index=idx, length=int(_need(r, "length", w)), tasks=tuple(str(t) for t in (r.get("tasks") or ())),
                data_path=data, rows=(int(_need(r, "dataset_from_index", w)), int(_need(r, "dataset_to_index", w))),
                videos=videos,
            ))
    return tasks, episodes


# ---------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------

class VideoFrames:
    """Decodes the frames of one video segment that match requested timestamps (PyAV), streaming.

    A requested time ``from_timestamp + t`` takes the decoded frame nearest to it; a frame farther than
    ``tolerance_s`` away counts as missing (the caller drops that step and says why). Only frames that
    are the nearest so far to some requested time are converted and passed through ``transform`` (the
    caller's preprocessing to the contract's size), so memory holds the steps' outputs, not the episode
    at the video's resolution.
    """

    def __init__(self, tolerance_s: float):
        self.tolerance_s = tolerance_s

    def frames(self, seg: VideoSegment, timestamps: np.ndarray, key: str,
               transform: Callable[[np.ndarray, float], Any] = lambda image, t: image) -> tuple[list[Any], np.ndarray]:
        """-> (per requested time: ``transform(rgb uint8 (h, w, 3), frame time)`` or None where missing,
        float64 |decoded time - wanted time| in s, inf where missing)."""
        av = _av()
        wanted = seg.from_timestamp + np.asarray(timestamps, dtype=np.float64)
        if not seg.path.is_file():
            raise LeRobotFormatError(f"{seg.path}: video file of feature '{key}' missing")
        n = len(wanted)
        out: list[Any] = [None] * n
        err = np.full(n, np.inf)
        if n == 0:
            return out, err
        lo, hi = float(wanted.min()) - self.tolerance_s, float(wanted.max()) + self.tolerance_s
        try:
            with av.open(str(seg.path)) as container:
                stream = container.streams.video[0]
                tb = float(stream.time_base)
                if lo > 0:
                    container.seek(int(lo / tb), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    t = frame.pts * tb
                    if t < lo:
                        continue
                    if t > hi:
                        break
                    dist = np.abs(wanted - t)
                    better = (dist < err) & (dist <= self.tolerance_s)
                    if better.any():
                        value = transform(frame.to_ndarray(format="rgb24"), t)
                        for j in np.flatnonzero(better):
                            out[j] = value
                        err[better] = dist[better]
        except av.error.FFmpegError as e:
            raise LeRobotFormatError(f"{seg.path}: cannot decode video of feature '{key}': {e}") from None
        return out, err
