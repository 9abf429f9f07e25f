#!/usr/bin/env bash
# Set up everything this repo needs on a fresh Debian 12 / Python 3.11 machine (no GPU, no apt ROS):
#   1. Debian packages, only if missing (needs root or passwordless sudo; `apt-get update` at most once):
#      Python venv/headers, a C/C++ toolchain + CMake (colcon builds msg/), EGL for headless MuJoCo.
#   2. .venv at the repo root (python3.11 -m venv) with requirements/*.txt
#      (torch, ROS 2 Kilted PyPI wheels, colcon, Meta-World, pytest, ...).
#   3. colcon build of msg/, srv/, launchers, launch/ and config/ into build/ install/ log/.
# Idempotent and fast on re-runs: each step leaves a stamp (hash of its inputs) and is skipped while
# the inputs are unchanged. Environment knobs:
#   QTR_PYTHON=/path/to/python3.11   interpreter for the venv (default: python3.11 on PATH)
#   QTR_VENV=/path/to/venv           venv location (default: <repo>/.venv)
#   QTR_SKIP_APT=1                   never touch apt (just warn about missing Debian packages)
#   QTR_FORCE=1                      redo every step
#   QTR_PIP_ARGS="..."               extra pip args (e.g. an index URL for a CPU-only torch)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QTR_VENV:-$REPO_ROOT/.venv}"
FORCE="${QTR_FORCE:-0}"
log() { echo "setup_env.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# 1. Debian packages
# ---------------------------------------------------------------------------------------------
APT_PACKAGES=(
  python3.11 python3.11-venv python3.11-dev   # venv + Python.h (rosidl builds a C extension)
  cmake g++ make                             # colcon build of msg/ and srv/
  libegl1 libegl-mesa0 libgl1-mesa-dri       # headless MuJoCo rendering (MUJOCO_GL=egl)
)

missing_apt_packages() {
  local pkg
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

install_apt_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    log "not a Debian system (no dpkg-query): make sure Python 3.11 (+venv, headers), cmake, g++, make and EGL are installed"
    return 0
  fi
  local missing
  mapfile -t missing < <(missing_apt_packages)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  # A python3.11 that is not Debian's (pyenv, conda) brings its own venv module and headers.
  if [[ -n "${QTR_PYTHON:-}" ]] || [[ "$(command -v python3.11 || true)" != /usr/bin/python3.11 ]]; then
    local keep=() pkg
    for pkg in "${missing[@]}"; do [[ "$pkg" == python3.11* ]] || keep+=("$pkg"); done
    missing=("${keep[@]+"${keep[@]}"}")
    [[ ${#missing[@]} -eq 0 ]] && return 0
  fi
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      log "WARNING: missing Debian packages (${missing[*]}) and no root/sudo to install them;" \
          "install them yourself: apt-get install ${missing[*]}"
      return 0
    fi
  fi
  if [[ "${QTR_SKIP_APT:-0}" == "1" ]]; then
    log "WARNING: QTR_SKIP_APT=1 and missing Debian packages: ${missing[*]}"
    return 0
  fi
  log "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

install_apt_packages

# ---------------------------------------------------------------------------------------------
# 2. venv + requirements
# ---------------------------------------------------------------------------------------------
PYTHON="${QTR_PYTHON:-$(command -v python3.11 || true)}"
[[ -z "$PYTHON" && -x /usr/bin/python3.11 ]] && PYTHON=/usr/bin/python3.11

if [[ ! -x "$VENV/bin/python" ]]; then
  [[ -n "$PYTHON" ]] || die "python3.11 not found; install it (apt-get install python3.11 python3.11-venv python3.11-dev) or set QTR_PYTHON"
  log "creating venv $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed (Debian: apt-get install python3.11-venv)"
fi
VPY="$VENV/bin/python"
"$VPY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || die "$VPY is not Python 3.11 (the ROS 2 Kilted wheels are built for cp311); remove $VENV and retry"

REQ_FILES=("$REPO_ROOT"/requirements/*.txt)
[[ -e "${REQ_FILES[0]}" ]] || die "no requirements/*.txt in $REPO_ROOT"
REQ_STAMP="$VENV/.qtr_requirements.sha256"
req_hash="$( { "$VPY" -VV; echo "${QTR_PIP_ARGS:-}"; cat "${REQ_FILES[@]}"; } | sha256sum | cut -d' ' -f1)"
if [[ "$FORCE" == "1" || ! -f "$REQ_STAMP" || "$(cat "$REQ_STAMP")" != "$req_hash" ]]; then
  log "installing Python requirements (${REQ_FILES[*]##*/}) into $VENV (first time: several minutes)"
  pip_req_args=()
  for f in "${REQ_FILES[@]}"; do pip_req_args+=(-r "$f"); done
  # shellcheck disable=SC2086  # QTR_PIP_ARGS is a list of words on purpose
  "$VPY" -m pip install --disable-pip-version-check --progress-bar off ${QTR_PIP_ARGS:-} "${pip_req_args[@]}"
  # lerobot and datasets (step 2b, test only) are installed without their dependency pins on purpose.
  conflicts="$("$VPY" -m pip check 2>&1 | grep -v -E '^(lerobot|datasets) |^No broken requirements' || true)"
  [[ -z "$conflicts" ]] || log "WARNING: 'pip check' reports conflicts: $(echo "$conflicts" | head -5)"
  echo "$req_hash" > "$REQ_STAMP.tmp" && mv "$REQ_STAMP.tmp" "$REQ_STAMP"
else
  log "Python requirements up to date (stamp $REQ_STAMP)"
fi

# 2b. Packages installed WITHOUT their dependencies (requirements/no-deps/*.txt): the real LeRobot
#     dataset writers the tests check us against. Their declared pins (torch<2.11, ...) would
#     downgrade what step 2 installed; what they really import is in requirements/test-lerobot.txt.
#     venv.txt goes into the venv; any other <name>.txt into $VENV/no-deps/<name> (a --target folder,
#     for a second release of a package that must not replace the first; tests put it on PYTHONPATH).
NODEPS_FILES=("$REPO_ROOT"/requirements/no-deps/*.txt)
NODEPS_STAMP="$VENV/.qtr_no_deps.sha256"
if [[ -e "${NODEPS_FILES[0]}" ]]; then
  nodeps_hash="$( { "$VPY" -VV; echo "${QTR_PIP_ARGS:-}"; for f in "${NODEPS_FILES[@]}"; do echo "$f"; cat "$f"; done; } \
                  | sha256sum | cut -d' ' -f1)"
  if [[ "$FORCE" == "1" || ! -f "$NODEPS_STAMP" || "$(cat "$NODEPS_STAMP")" != "$nodeps_hash" ]]; then
    for f in "${NODEPS_FILES[@]}"; do
      name="$(basename "$f" .txt)"
      target_args=()
      if [[ "$name" != "venv" ]]; then
        rm -rf "$VENV/no-deps/$name"
        target_args=(--target "$VENV/no-deps/$name")
      fi
      log "installing ${f##*/requirements/} without dependencies${target_args[1]:+ into ${target_args[1]}}"
      # shellcheck disable=SC2086
      "$VPY" -m pip install --disable-pip-version-check --progress-bar off --no-deps ${QTR_PIP_ARGS:-} \
        "${target_args[@]}" -r "$f"
    done
    echo "$nodeps_hash" > "$NODEPS_STAMP.tmp" && mv "$NODEPS_STAMP.tmp" "$NODEPS_STAMP"
  else
    log "no-deps packages up to date (stamp $NODEPS_STAMP)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 3. colcon build (msg/, srv/, launchers, launch/, config/, our Python modules into install/)
# ---------------------------------------------------------------------------------------------
BUILD_STAMP="$REPO_ROOT/install/.qtr_build.sha256"
build_inputs_hash() {
  # Everything the install tree is made of: content and names (new/removed files change the hash).
  cd "$REPO_ROOT"
  {
    "$VPY" -VV
    find package.xml CMakeLists.txt msg srv launch config scripts/ros_executables q_transformer_ros \
         -type f ! -path '*/__pycache__/*' ! -name '*.pyc' 2>/dev/null | LC_ALL=C sort | while read -r f; do
      echo "$f"; sha256sum < "$f"
    done
  } | sha256sum | cut -d' ' -f1
}
build_hash="$(build_inputs_hash)"
if [[ "$FORCE" == "1" || ! -f "$BUILD_STAMP" || "$(cat "$BUILD_STAMP")" != "$build_hash" ]]; then
  log "colcon build (inputs changed; the first build takes a few minutes)"
  QTR_VENV="$VENV" bash "$REPO_ROOT/scripts/colcon_build.sh"
  echo "$build_hash" > "$BUILD_STAMP.tmp" && mv "$BUILD_STAMP.tmp" "$BUILD_STAMP"
else
  log "colcon install up to date (stamp $BUILD_STAMP)"
fi
log "ready: source scripts/ros_env.sh"
