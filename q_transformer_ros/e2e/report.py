"""The demo's and the learning benchmark's results: per-task table, value calibration, plots, GIF.

Pure functions over plain records (no ROS, no torch), so the table a run prints can be checked
from known inputs in a test.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


@dataclass
class EpisodeRecord:
    """One episode of data or of a closed-loop evaluation."""

    task: str
    seed: int
    success: bool
    steps: int = 0
    values: list[float] = field(default_factory=list)
    """The policy's predicted value at every commanded step (closed loop); empty for data."""
    noise: float | None = None
    """Expert noise std (recorded data)."""
    source: str = ""
    """Bag path, dataset source id, or 'closed loop'."""
    operator: str = "expert"
    """Operator style of recorded data (``sim.operators``)."""

    @property
    def mean_value(self) -> float:
        """Mean predicted value over the episode (NaN when no value was seen)."""
        return self.early_value(None)

    def early_value(self, window: int | None) -> float:
        """Mean predicted value over the first ``window`` decisions (all of them for ``None``, or when the
        episode ended sooner); NaN when no value was seen. See ``value_window`` for why."""
        if window is not None and window < 1:
            raise ValueError(f"early_value: window {window} must be >= 1 (None = the whole episode)")
        vals = self.values if window is None else self.values[:window]
        return float(np.mean(vals)) if vals else math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpisodeRecord":
        return cls(**{k: d[k] for k in ("task", "seed", "success", "steps", "values", "noise", "source", "operator") if k in d})


@dataclass
class TaskRow:
    """One line of the results table."""

    task: str
    data_episodes: int
    data_success: float
    """Success rate of the recorded data (NaN without data)."""
    eval_episodes: dict[str, int]
    """Policy name -> closed-loop episodes."""
    eval_success: dict[str, float]
    """Policy name -> closed-loop success rate."""
    value_success: float
    """Mean predicted value (over each episode's value window) of closed-loop episodes that succeeded
    (first policy; NaN if none)."""
    value_failure: float
    """The same over closed-loop episodes that failed (first policy; NaN if none)."""
    value_auroc: float = math.nan
    """AUROC of the first policy's per-episode value, success vs failure, over this row's episodes (NaN
    without both outcomes). Why per task too: the overall AUROC also rewards a value that only ranks tasks
    (an easy task's episodes high, a hard one's low); a task's own AUROC asks whether the value tells this
    task's successes from its failures."""


def value_window(max_episode_steps: int) -> int:
    """Decisions over which an episode's predicted value is averaged for calibration: the first half of
    the episode's step budget.

    Why not the whole episode: a failed episode runs to the budget, a successful one ends when it
    succeeds, so a whole-episode mean compares different stretches of time. Late in a failure the
    policy is often stuck next to the goal, and the Q there is the return of acting well from a state
    near success (high), not of the stuck policy; the failure's extra steps then raise its mean. A
    window of the same length for every episode asks what the value predicted early, before either
    outcome is visible (an episode that ends sooner is averaged over its own steps). Measured on the
    demo's closed loops with the beam margin (benchmarks/README.md, "Learning, session 13")."""
    if max_episode_steps < 1:
        raise ValueError(f"value_window: max_episode_steps {max_episode_steps} must be >= 1")
    return max(1, max_episode_steps // 2)


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def summarize(data: Sequence[EpisodeRecord], evals: dict[str, Sequence[EpisodeRecord]],
              tasks: Sequence[str] | None = None, window: int | None = None) -> list[TaskRow]:
    """One row per task (in ``tasks`` order, else first appearance) plus an ``overall`` row.

    Rates are per episode; the overall row pools all episodes (not an average of task rates). Value
    columns use the first policy in ``evals`` (the Q-Transformer in the demo), each episode's value
    averaged over its first ``window`` decisions (``value_window``; None = the whole episode)."""
    if tasks is None:
        seen: dict[str, None] = {}
        for ep in list(data) + [e for eps in evals.values() for e in eps]:
            seen.setdefault(ep.task, None)
        tasks = list(seen)
    first = next(iter(evals), None)

    def row(name: str, keep: Any) -> TaskRow:
        d = [e for e in data if keep(e)]
        ev = {p: [e for e in eps if keep(e)] for p, eps in evals.items()}
        main = ev.get(first, []) if first is not None else []
        return TaskRow(
            task=name, data_episodes=len(d), data_success=_rate([e.success for e in d]),
            eval_episodes={p: len(v) for p, v in ev.items()}, eval_success={p: _rate([e.success for e in v]) for p, v in ev.items()},
            value_success=_mean([e.early_value(window) for e in main if e.success]),
            value_failure=_mean([e.early_value(window) for e in main if not e.success]),
            value_auroc=value_auroc([e.early_value(window) for e in main], [e.success for e in main]),
        )

    rows = [row(t, lambda e, t=t: e.task == t) for t in tasks]
    rows.append(row("overall", lambda e: e.task in set(tasks)))
    return rows


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate (95 % for z = 1.96); (NaN, NaN) without episodes.

    Why Wilson: with 3-10 episodes per task the normal approximation gives intervals outside [0, 1]
    and a zero width at 0 % or 100 %; Wilson's stays inside and honest (0/10 -> 0-28 %)."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def value_auroc(values: Sequence[float], successes: Sequence[bool]) -> float:
    """Area under the ROC curve of the predicted value for success vs failure (ties count half): the
    chance that a random successful episode got a higher value than a random failed one. NaN when
    either class is missing (values that are NaN are dropped)."""
    pairs = [(float(v), bool(s)) for v, s in zip(values, successes) if not math.isnan(float(v))]
    pos = [v for v, s in pairs if s]
    neg = [v for v, s in pairs if not s]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def auroc_interval(auroc: float, positives: int, negatives: int, z: float = 1.96) -> tuple[float, float]:
    """Hanley-McNeil (1982) interval of an AUROC (95 % for z = 1.96), clipped to [0, 1]; (NaN, NaN) when
    undefined. Why: one demo run has ~60 episodes, and at an AUROC near 0.75 its interval is about
    ±0.13, so a single run's AUROC above or below a threshold says little; the interval says how little."""
    if math.isnan(auroc) or positives < 1 or negatives < 1:
        return math.nan, math.nan
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


def _interval(rate: float, n: int) -> str:
    if n <= 0 or math.isnan(rate):
        return "       "
    lo, hi = wilson_interval(round(rate * n), n)
    return f"[{100 * lo:2.0f}-{100 * hi:3.0f}]"


def _pct(x: float) -> str:
    return "   -" if math.isnan(x) else f"{100 * x:3.0f}%"


def _val(x: float) -> str:
    return "    -" if math.isnan(x) else f"{x:5.3f}"


def format_table(rows: Sequence[TaskRow]) -> str:
    """Plain-text table: data success, closed-loop success per policy with its Wilson 95 % interval,
    value on success vs failure and its AUROC (the first policy's)."""
    policies = list(rows[0].eval_success) if rows else []
    width = max([len(r.task) for r in rows] + [8])
    head = f"{'task':<{width}}  {'data':>10}"
    for p in policies:
        head += f"  {p + ' closed loop [95% CI]':>24}"
    head += f"  {'V|success':>9}  {'V|failure':>9}  {'AUROC':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.task == "overall":
            lines.append("-" * len(head))
        line = f"{r.task:<{width}}  {_pct(r.data_success):>5} n={r.data_episodes:<3}"
        for p in policies:
            line += f"  {_pct(r.eval_success[p]):>10} {_interval(r.eval_success[p], r.eval_episodes[p])} n={r.eval_episodes[p]:<3}"
        line += f"  {_val(r.value_success):>9}  {_val(r.value_failure):>9}  {_val(r.value_auroc):>5}"
        lines.append(line)
    return "\n".join(lines)


def calibration_bins(values: Sequence[float], successes: Sequence[bool], bins: int = 5) -> list[tuple[float, float, int, float]]:
    """Reliability table: (bin low, bin high, episodes, observed success rate) over [0, 1] value bins."""
    v = np.asarray(values, dtype=np.float64)
    s = np.asarray(successes, dtype=bool)
    keep = ~np.isnan(v)
    v, s = v[keep], s[keep]
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        m = (v >= lo) & ((v < hi) if i < bins - 1 else (v <= hi))
        out.append((float(lo), float(hi), int(m.sum()), float(s[m].mean()) if m.any() else math.nan))
    return out


def format_auroc(values: Sequence[float], successes: Sequence[bool]) -> str:
    """'0.733 [0.61-0.86]': the AUROC with its Hanley-McNeil 95 % interval, or '-' without both outcomes."""
    auroc = value_auroc(values, successes)
    if math.isnan(auroc):
        return "-"
    kept = [bool(x) for v, x in zip(values, successes) if not math.isnan(float(v))]
    lo, hi = auroc_interval(auroc, sum(kept), len(kept) - sum(kept))
    return f"{auroc:.3f} [{lo:.2f}-{hi:.2f}]"


def format_calibration(episodes: Sequence[EpisodeRecord], window: int | None = None, bins: int = 5) -> str:
    """Reliability table and AUROC of the episodes' value over ``window`` (``value_window``); with a
    window, also the AUROC of the whole-episode mean, so that the two can be compared on every run."""
    values, successes = [e.early_value(window) for e in episodes], [e.success for e in episodes]
    lines = ["predicted value   episodes   observed success"]
    for lo, hi, n, rate in calibration_bins(values, successes, bins):
        lines.append(f"[{lo:.1f}, {hi:.1f}{']' if hi >= 1 else ')'}      {n:>8}   {_pct(rate):>16}")
    auroc = format_auroc(values, successes)
    if auroc == "-":
        lines.append("value AUROC (success vs failure): - (needs both successes and failures)")
        return "\n".join(lines)
    lines.append(f"value AUROC (success vs failure): {auroc} (Hanley-McNeil 95 %)")
    if window is not None:
        whole = format_auroc([e.mean_value for e in episodes], successes)
        lines.append(f"  over whole episodes instead of the first {window} decisions: {whole}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_records(path: Path) -> list[EpisodeRecord]:
    """Episodes from a JSON-lines file (missing file: none)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(EpisodeRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{i}: not an episode record ({e}): {line[:120]!r}") from None
    return out


def write_records(path: Path, records: Iterable[EpisodeRecord]) -> None:
    """Replace the JSON-lines file atomically (a crash leaves the previous complete file)."""
    write_text_atomic(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def plot_value_vs_success(evals: dict[str, Sequence[EpisodeRecord]], path: Path,
                          window: int | None = None) -> Path | None:
    """Left: per-episode predicted value (mean over ``window`` decisions) by outcome. Right: value over
    time, coloured by outcome, the window's end marked."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    eps = list(evals[next(iter(evals))]) if evals else []  # the first policy (the Q-Transformer)
    if not any(e.values for e in eps):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rng = np.random.default_rng(0)
    for x, ok, color in ((0, False, "tab:red"), (1, True, "tab:green")):
        vals = [e.early_value(window) for e in eps if e.success == ok and e.values]
        ax1.scatter(x + rng.uniform(-0.12, 0.12, len(vals)), vals, color=color, alpha=0.8)
        if vals:
            ax1.hlines(np.mean(vals), x - 0.25, x + 0.25, color="black")
    ax1.set_xticks([0, 1], ["failure", "success"])
    ax1.set_xlim(-0.6, 1.6)
    ax1.set_ylabel("mean predicted value " + ("(episode)" if window is None else f"(first {window} steps)"))
    ax1.set_title("closed loop: predicted value vs outcome")
    for e in eps:
        if e.values:
            ax2.plot(e.values, color="tab:green" if e.success else "tab:red", alpha=0.6, lw=1)
    if window is not None:
        ax2.axvline(window, color="black", ls="--", lw=1)
    ax2.set_xlabel("control step")
    ax2.set_ylabel("predicted value")
    ax2.set_title("value over the episode (green: success)")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_gif(frames: Sequence[np.ndarray], path: Path, values: Sequence[float] = (), fps: float = 10.0,
              scale: int = 3) -> Path:
    """GIF of uint8 (H, W, 3) frames, upscaled ``scale`` x, with a bar under each frame showing the
    predicted value at that step (green width = value), when values are given."""
    import imageio.v2 as imageio  # noqa: PLC0415

    if not frames:
        raise ValueError(f"write_gif({path}): no frames")
    out = []
    for i, frame in enumerate(frames):
        img = np.repeat(np.repeat(np.asarray(frame, dtype=np.uint8), scale, axis=0), scale, axis=1)
        if len(values):
            v = float(values[min(len(values) - 1, int(i * len(values) / len(frames)))])
            bar = np.full((6, img.shape[1], 3), 40, dtype=np.uint8)
            bar[:, : int(round(np.clip(v, 0, 1) * img.shape[1]))] = (60, 200, 60)
            img = np.concatenate([img, bar], axis=0)
        out.append(img)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    imageio.mimsave(tmp, out, format="GIF", duration=1.0 / fps, loop=0)
    os.replace(tmp, path)
    return path
