#!/usr/bin/env bash
# Create .venv-bench: a SEPARATE virtual environment holding the reference implementation
# lucidrains/q-transformer 0.5.0 (PyPI `q-transformer`) and its dependencies, for the side-by-side
# benchmarks in benchmarks/.  Usage (from anywhere):
#
#     scripts/setup_bench_env.sh            # create or update .venv-bench at the repo root
#     MAIN_VENV=/path/to/.venv scripts/setup_bench_env.sh
#     BENCH_VENV=/tmp/venv-bench scripts/setup_bench_env.sh
#
# Why a separate venv: the reference pins/pulls packages we do not want in our own environment
# (x-transformers, classifier-free-guidance-pytorch -> transformers, accelerate, hyper-connections ...).
#
# How torch is shared (and why this way): torch + its CUDA wheels are ~4 GB, so we do not install a
# second copy.  `python -m venv --system-site-packages` cannot be used because the main env is itself a
# venv (it would expose the *system* Python's packages, not the main venv's).  Pointing a .pth file at
# the whole main site-packages would leak every package of the main env (einops, numpy, open_clip ...)
# into the bench env.  Instead we build a *symlink farm*: .venv-bench/shared-torch/ holds symlinks to
# exactly the installed files of torch, torchvision and their transitive runtime dependencies
# (computed from the main env's package metadata, markers evaluated), including their .dist-info
# folders so that pip sees torch as installed and does not download another copy.  A .pth file
# (_shared_torch.pth) appends that folder to sys.path; packages pip installs into .venv-bench itself
# come first on sys.path, so the bench env can still override anything it must.
#
# The reference itself and its other dependencies are then installed from PyPI with pip.  If the
# shared torch cannot be used (no main venv), torch is installed into .venv-bench from PyPI instead.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN_VENV="${MAIN_VENV:-$REPO_ROOT/.venv}"
BENCH_VENV="${BENCH_VENV:-$REPO_ROOT/.venv-bench}"
REFERENCE_SPEC="${REFERENCE_SPEC:-q-transformer==0.5.0}"
PYTHON="${PYTHON:-python3.11}"

if [[ -x "$MAIN_VENV/bin/python" ]]; then
    PYTHON="$MAIN_VENV/bin/python"   # same interpreter version as the main env: required to share torch
fi

echo "[setup_bench_env] creating $BENCH_VENV with $PYTHON"
"$PYTHON" -m venv "$BENCH_VENV"
BENCH_PY="$BENCH_VENV/bin/python"
BENCH_SITE="$("$BENCH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

if [[ -x "$MAIN_VENV/bin/python" ]] && "$MAIN_VENV/bin/python" -c 'import torch' 2>/dev/null; then
    SHARED="$BENCH_VENV/shared-torch"
    echo "[setup_bench_env] sharing torch from $MAIN_VENV via symlinks in $SHARED"
    "$MAIN_VENV/bin/python" - "$SHARED" <<'PY'
"""Symlink torch, torchvision and their runtime dependency closure into one folder."""
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

shared = Path(sys.argv[1])
if shared.exists():
    shutil.rmtree(shared)
shared.mkdir(parents=True)

# setuptools/pip belong to each venv itself; never share them.
skip = {"setuptools", "pip", "wheel"}
queue = [("torch", frozenset()), ("torchvision", frozenset())]
seen: dict[str, set[str]] = {}
while queue:
    name, extras = queue.pop()
    key = canonicalize_name(name)
    if key in skip or (key in seen and extras <= seen[key]):
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        if name == "torchvision":
            continue
        raise
    seen.setdefault(key, set()).update(extras)
    for line in dist.requires or []:
        req = Requirement(line)
        envs = [{"extra": e} for e in (set(extras) | {""})]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            queue.append((req.name, frozenset(req.extras)))

linked = 0
for key in sorted(seen):
    dist = distribution(key)
    root = Path(dist.locate_file(""))
    tops = {Path(f).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
    for top in sorted(tops):
        src = root / top
        dst = shared / top
        if src.exists() and not dst.exists() and top != "__pycache__":
            os.symlink(src, dst)
            linked += 1
print(f"[setup_bench_env] shared {len(seen)} distributions ({linked} links): {', '.join(sorted(seen))}")
PY
    echo "$SHARED" > "$BENCH_SITE/_shared_torch.pth"
else
    echo "[setup_bench_env] no usable main venv at $MAIN_VENV: installing torch into $BENCH_VENV from PyPI"
    "$BENCH_PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi

echo "[setup_bench_env] installing $REFERENCE_SPEC and its dependencies"
"$BENCH_PY" -m pip install --upgrade "$REFERENCE_SPEC"

# Fail loudly if pip replaced the shared torch with a second copy, or the reference does not import.
"$BENCH_PY" - <<'PY'
import torch, q_transformer
from importlib.metadata import version
print(f"[setup_bench_env] ok: torch {torch.__version__} from {torch.__file__}; "
      f"q-transformer {version('q-transformer')} from {q_transformer.__file__}")
PY
