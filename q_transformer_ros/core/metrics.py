"""Training metrics: one JSON object per logged step in ``metrics.jsonl``, TensorBoard event files next
to it, and a PNG of the curves.

Why JSONL: append-only (a killed run loses at most the line being written), readable by any tool, and
a resumed run can drop the lines past the checkpoint it resumed from so the curve has no duplicates.
TensorBoard gets the same scalars under the same keys (``losses/td_loss``, ``q/mean_q``, ``lr`` ...), so
``tensorboard --logdir runs/`` shows every run of a folder side by side; a resumed run purges the
events past its checkpoint the same way (``purge_step``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

DEFAULT_PLOT_KEYS = (
    "losses/loss",
    "losses/td_loss",
    "losses/conservative_loss",
    "losses/bc_loss",
    "q/mean_q",
    "q/mean_target",
    "grad_norm",
    "lr",
    "charts/samples_per_s",
)


class MetricsLogger:
    """Appends ``{"step": int, key: float, ...}`` lines to a JSONL file.

    ``resume_step``: records with a step greater than this are removed first (they came from the part
    of a killed run after its last checkpoint, which the resumed run repeats).
    ``tensorboard_dir``: also write every record as TensorBoard scalars there (event files)."""

    def __init__(self, path: str | Path, resume_step: int | None = None,
                 tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge, flush_secs=30)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        record: dict[str, Any] = {"step": int(step)}
        for k, v in values.items():
            record[k] = float(v)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, global_step=int(step))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path, keys: Iterable[str] = DEFAULT_PLOT_KEYS) -> Path | None:
    """Plot every present key against the step, one panel each, into ``png_path`` (written atomically).

    Returns the path, or None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return None
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, present):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if key in ("losses/loss", "losses/td_loss", "losses/conservative_loss", "losses/bc_loss") and pts and min(v for _, v in pts) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
