"""Write LeRobot test datasets with the REAL lerobot writers (not with our reader's assumptions).

- v3.0: lerobot 0.4.4 (``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize``),
  installed in the venv by scripts/setup_env.sh (requirements/no-deps/venv.txt), run in-process.
- v2.1: lerobot 0.3.3, the last release that writes v2.1, installed apart in
  ``<venv>/no-deps/lerobot-v21`` (requirements/no-deps/lerobot-v21.txt) and run in a subprocess with
  that folder first on PYTHONPATH (this file is the subprocess's script: ``python lerobot_factory.py
  SPEC.pkl``). Its API differs only in ``add_frame(frame, task=...)`` and the missing ``finalize``.

A spec is ``{"root", "fps", "features", "episodes": [{"task", "frames": [{feature: value}]}], "vcodec"}``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

V21_TARGET = Path(sys.prefix) / "no-deps" / "lerobot-v21"


def write_with_lerobot(spec: dict[str, Any]) -> Path:
    """Write ``spec`` with whichever lerobot is importable (0.4.x: v3.0, 0.3.x: v2.1)."""
    import lerobot
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    v21 = lerobot.__version__.startswith("0.3")
    kw = {} if v21 else {"vcodec": spec.get("vcodec", "libsvtav1")}
    ds = LeRobotDataset.create(repo_id="test/" + Path(spec["root"]).name, fps=spec["fps"], root=spec["root"],
                               features=spec["features"], use_videos=spec.get("use_videos", True),
                               image_writer_threads=0, **kw)
    for ep in spec["episodes"]:
        for frame in ep["frames"]:
            frame = dict(frame)
            if v21:
                ds.add_frame(frame, task=ep["task"])
            else:
                ds.add_frame({**frame, "task": ep["task"]})
        with numpy24_scalar_shim():
            ds.save_episode()
    if not v21:
        ds.finalize()
    return Path(spec["root"])


def write_v21(specs: list[dict[str, Any]], tmp: Path) -> None:
    """Write v2.1 datasets with lerobot 0.3.3 in one subprocess (it cannot share a process with 0.4.4)."""
    if not (V21_TARGET / "lerobot").is_dir():
        raise RuntimeError(f"lerobot 0.3.3 not installed at {V21_TARGET}: run bash scripts/setup_env.sh "
                           f"(requirements/no-deps/lerobot-v21.txt)")
    spec_file = tmp / "v21_specs.pkl"
    spec_file.write_bytes(pickle.dumps(specs))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(V21_TARGET), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-P", __file__, str(spec_file)], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"lerobot 0.3.3 writer failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@contextlib.contextmanager
def numpy24_scalar_shim() -> Iterator[None]:
    """LeRobot stores a (1,) number feature (``next.reward``) as a (1,) array and ``datasets`` then calls
    ``float(value)`` on it, which NumPy >= 2.4 refuses for 1-D arrays; LeRobot's own recordings of such
    a feature fail the same way in this environment. Unwrap one-element arrays for the write only."""
    from datasets.features import features as hf

    original = hf.Value.encode_example

    def encode_example(self: Any, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.shape == (1,):
            value = value[0]
        return original(self, value)

    hf.Value.encode_example = encode_example
    try:
        yield
    finally:
        hf.Value.encode_example = original


def smooth_frames(T: int, h: int, w: int, seed: int) -> np.ndarray:
    """uint8 (T, h, w, 3) frames that a video codec keeps close and that differ a lot between steps."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((T, h, w, 3), np.uint8)
    for t in range(T):
        base = (seed * 37 + t * 53) % 200
        out[t, ..., 0] = base + 50 * (x / w)
        out[t, ..., 1] = 255 - base - 40 * (y / h)
        out[t, ..., 2] = (base * 3 + 60) % 200 + 20
    return out


if __name__ == "__main__":
    import lerobot

    assert lerobot.__version__.startswith("0.3"), f"expected lerobot 0.3.x (v2.1 writer), got {lerobot.__version__}"
    for s in pickle.loads(Path(sys.argv[1]).read_bytes()):
        write_with_lerobot(s)
