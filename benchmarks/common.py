"""Shared helpers of the benchmark scripts: thread pinning, timing with warm-up, p50/p99, tables,
the benchmark model sizes, and running the reference worker in its own venv.

Why one module: every number in a table must come from the same timing code, the same thread count and
the same architecture sizes on both sides (ours and the reference). This file imports only the standard
library and torch, because it is imported both by our scripts (in .venv) and by
``reference_worker.py`` (in .venv-bench, where our package is not installed).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_REFERENCE_PYTHON = REPO_ROOT / ".venv-bench" / "bin" / "python"
REFERENCE_WORKER = BENCH_DIR / "reference_worker.py"


# ---------------------------------------------------------------------------------------------
# architecture sizes shared by both sides
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchArch:
    """One benchmark model size, expressed once and translated to both implementations."""

    name: str
    """Key used on the command line (``--configs``) and in the tables."""
    image_size: int
    """Square frame side H = W in pixels."""
    frames: int
    """Frame history F the model sees per decision."""
    num_actions: int
    """Action dims N decoded autoregressively."""
    action_bins: int
    """Bins per action dim."""
    dim: int
    """MaxViT first-stage channels (doubling per stage)."""
    dim_conv_stem: int
    """MaxViT convolutional stem channels."""
    depth: tuple[int, ...]
    """MaxViT blocks per stage."""
    heads: int
    """Attention heads (MaxViT, history transformer, action head)."""
    dim_head: int
    """Width of one attention head."""
    window_size: int
    """MaxViT block/grid window side."""
    transformer_depth: int
    """Layers of the history transformer over the frame tokens."""
    head_depth: int
    """Layers of the autoregressive action head."""
    tokens_per_frame: int = 8
    """TokenLearner tokens per frame."""
    dueling: bool = True
    """Dueling Q head (the reference README sets it)."""
    dropout: float = 0.1
    """Dropout (eval mode for latency, active for training)."""
    preset: str = "base"
    """Our ModelConfig preset the overrides are applied to."""

    def __post_init__(self) -> None:
        f = 2 ** (len(self.depth) + 1)
        if self.image_size % f or (self.image_size // f) % self.window_size:
            raise ValueError(f"BenchArch '{self.name}': image_size {self.image_size} does not fit depth {self.depth} "
                             f"with window {self.window_size}")

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def reference_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``q_transformer.QRoboticTransformer`` (condition_on_text=False: the text
        path needs T5 weights from a model hub, which this machine cannot reach)."""
        return dict(
            vit=dict(num_classes=1000, dim_conv_stem=self.dim_conv_stem, dim=self.dim, dim_head=self.dim_head,
                     heads=self.heads, depth=tuple(self.depth), window_size=self.window_size,
                     mbconv_expansion_rate=4, mbconv_shrinkage_rate=0.25, dropout=self.dropout),
            num_actions=self.num_actions,
            action_bins=self.action_bins,
            depth=self.transformer_depth,
            heads=self.heads,
            dim_head=self.dim_head,
            token_learner_num_output_tokens=self.tokens_per_frame,
            cond_drop_prob=0.2,
            dueling=self.dueling,
            condition_on_text=False,
            q_head_attn_kwargs=dict(attn_heads=self.heads, attn_dim_head=self.dim_head, attn_depth=self.head_depth),
        )

    def ours_overrides(self) -> dict[str, Any]:
        """Overrides of ``ModelConfig.preset(self.preset, contract, ...)`` giving the same sizes."""
        return dict(dim=self.dim, dim_conv_stem=self.dim_conv_stem, depth=tuple(self.depth), heads=self.heads,
                    dim_head=self.dim_head, window_size=self.window_size, transformer_depth=self.transformer_depth,
                    head_depth=self.head_depth, tokens_per_frame=self.tokens_per_frame, dueling=self.dueling,
                    dropout=self.dropout, mbconv_expansion_rate=4.0, mbconv_shrinkage_rate=0.25)


ARCHS: dict[str, BenchArch] = {
    # The reference README example: 56.5 M parameters, 6 frames of 224x224, 8 dims x 256 bins.
    "readme": BenchArch(name="readme", image_size=224, frames=6, num_actions=8, action_bins=256, dim=64,
                        dim_conv_stem=64, depth=(2, 2, 5, 2), heads=8, dim_head=64, window_size=7,
                        transformer_depth=1, head_depth=2, preset="base"),
    # A small robot-sized config: 2 frames of 64x64, 4 dims x 64 bins, our 'small' preset's MaxViT.
    "small": BenchArch(name="small", image_size=64, frames=2, num_actions=4, action_bins=64, dim=32,
                       dim_conv_stem=32, depth=(1, 2, 1), heads=4, dim_head=16, window_size=4,
                       transformer_depth=2, head_depth=2, preset="small"),
}


def parse_configs(text: str) -> list[BenchArch]:
    """'small,readme' -> [ARCHS['small'], ARCHS['readme']] with a clear error for unknown names."""
    out = []
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        if name not in ARCHS:
            raise SystemExit(f"--configs: unknown config {name!r}; choose from {sorted(ARCHS)}")
        out.append(ARCHS[name])
    if not out:
        raise SystemExit("--configs: empty list")
    return out


# ---------------------------------------------------------------------------------------------
# threads, header
# ---------------------------------------------------------------------------------------------

def default_threads() -> int:
    """Torch's intra-op thread count unless told otherwise (= physical cores on most machines)."""
    import torch

    return int(torch.get_num_threads())


def pin_threads(threads: int) -> int:
    """Set torch's intra-op threads (and inter-op to 1, once, where still allowed); returns the count."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set or parallel work already ran in this process
    return int(torch.get_num_threads())


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_header(title: str, argv: Sequence[str] | None, threads: int) -> None:
    """Print what was run and on what, so every table can be reproduced."""
    import torch

    cmd = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0] if argv is None else "<in-process>",
                                            *(sys.argv[1:] if argv is None else argv)])
    print(f"# {title}")
    print(f"command: {cmd}")
    print(f"torch {torch.__version__} | torch threads {threads} | cpu count {os.cpu_count()} | "
          f"load average {load_average()} | {platform.processor() or platform.machine()} | "
          f"cuda {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

@dataclass
class TimingStats:
    """Wall times of repeated calls, in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    cpu_p50_ms: float = math.nan
    """Median process CPU time per call (all threads): robust to other processes competing for the
    cores, which inflate wall times; with several threads it includes their spin-waiting."""
    samples_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TimingStats":
        return cls(**{k: d[k] for k in ("n", "p50_ms", "p99_ms", "mean_ms", "min_ms")},
                   cpu_p50_ms=d.get("cpu_p50_ms", math.nan), samples_ms=list(d.get("samples_ms", [])))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] (numpy's default), without numpy."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def stats_from_seconds(samples_s: Sequence[float], cpu_s: Sequence[float] = ()) -> TimingStats:
    ms = [s * 1e3 for s in samples_s]
    return TimingStats(n=len(ms), p50_ms=percentile(ms, 50), p99_ms=percentile(ms, 99),
                       mean_ms=statistics.fmean(ms) if ms else math.nan, min_ms=min(ms) if ms else math.nan,
                       cpu_p50_ms=percentile([c * 1e3 for c in cpu_s], 50) if cpu_s else math.nan,
                       samples_ms=[round(x, 3) for x in ms])


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, before: Callable[[], Any] | None = None) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed, then ``iters`` times timed one by one.

    ``before`` (untimed) runs before every call, e.g. to push the frames a streaming step consumes."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(max(0, warmup)):
        if before is not None:
            before()
        fn()
    cuda_sync()
    samples, cpu = [], []
    for _ in range(iters):
        if before is not None:
            before()
        cuda_sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        cuda_sync()
        samples.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return stats_from_seconds(samples, cpu)


def count_params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 1e4:
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        if 0 < abs(x) < 10 ** -digits * 10:
            return f"{x:.3g}"  # small values keep 3 significant digits
        return f"{x:.{digits}f}"
    return str(x)


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, None when either side is missing (e.g. the reference env is absent)."""
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """Print a Markdown table (pastes straight into benchmarks/README.md); returns it."""
    cells = [[fmt(c, digits) for c in r] for r in rows]
    numeric = [[isinstance(c, (int, float)) or c is None for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, nr)) + " |"
              for r, nr in zip(cells, numeric)]
    text = "\n".join(lines)
    print(text)
    sys.stdout.flush()
    return text


# ---------------------------------------------------------------------------------------------
# the reference, in its own venv
# ---------------------------------------------------------------------------------------------

class ReferenceUnavailable(RuntimeError):
    """The reference venv is missing or the worker failed; the message says which and how to fix it."""


def reference_python(path: str | os.PathLike[str] | None) -> Path | None:
    """The bench venv's interpreter, or None when it does not exist (scripts then skip the reference)."""
    p = Path(path) if path else DEFAULT_REFERENCE_PYTHON
    return p if p.exists() else None


def resolve_sides(args: Any, ref_missing_note: str = "") -> tuple[Path | None, str | None]:
    """Which sides of a comparison can run: (reference python or None, reason ours is skipped or None).

    Prints one line for each side that is skipped, so a table with a missing column says why."""
    ref_py = None if args.no_reference else reference_python(args.reference_python)
    if not args.no_reference and ref_py is None:
        print(f"reference: skipped ({args.reference_python or DEFAULT_REFERENCE_PYTHON} not found; "
              f"run scripts/setup_bench_env.sh){ref_missing_note}")
    ours_reason = "--no-ours" if args.no_ours else None
    if ours_reason is None:
        import _ours

        ours_reason = _ours.ours_available()
    if ours_reason:
        print(f"ours: skipped ({ours_reason})")
    return ref_py, ours_reason


def run_reference_worker(python: Path, args: Sequence[str], threads: int, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``reference_worker.py`` in the bench venv with the same thread count; returns its JSON.

    The worker prints exactly one JSON object on its last stdout line; its logs go to stderr, which
    we pass through so progress stays visible."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # nothing of our env may leak into the reference's
    cmd = [str(python), str(REFERENCE_WORKER), *args, "--threads", str(threads)]
    print(f"reference: {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, timeout=timeout_s,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        raise ReferenceUnavailable(f"reference worker {' '.join(args)} ran past {timeout_s} s") from None
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise ReferenceUnavailable(f"reference worker {' '.join(args)} failed with exit code {proc.returncode}; "
                                   f"stdout tail: {proc.stdout[-500:]!r}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ReferenceUnavailable(f"reference worker {' '.join(args)} printed no JSON last line: {lines[-1][:300]!r}") from None


def ensure_repo_on_path() -> None:
    """Make ``import q_transformer_ros`` work when a script is run as ``python benchmarks/x.py``.

    Only when it is not importable already, and appended (not prepended), so an installed copy (e.g. the
    colcon install with the generated msg/srv, used by the test suite) is never shadowed."""
    import importlib.util

    if importlib.util.find_spec("q_transformer_ros") is None and str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write results atomically (temp file, then rename) when ``--json-out`` was given."""
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, p)
