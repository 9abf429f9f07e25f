#!/usr/bin/env bash
# Build the ROS 2 face of q_transformer_ros (msg/, srv/, executables, launch/, config/) with colcon,
# against the ROS 2 Kilted PyPI wheels in the repo's .venv (no apt ROS needed).
# Output: build/ install/ log/ at the repo root. Use scripts/ros_env.sh to get the overlay.
#   Usage: bash scripts/colcon_build.sh [extra colcon build args]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QTR_VENV:-$REPO_ROOT/.venv}"
PY="$VENV/bin/python"

if [[ ! -x "$PY" ]]; then
  echo "colcon_build.sh: no Python at $PY; run 'bash scripts/setup_env.sh' first" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/colcon" ]]; then
  echo "colcon_build.sh: colcon missing in $VENV (requirements/ros.txt); run 'bash scripts/setup_env.sh'" >&2
  exit 1
fi

# The wheels install their ament index and CMake configs under the venv prefix.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
# The rosidl generators run as python subprocesses of CMake: the ROS wheels' shared libraries must resolve.
export LD_LIBRARY_PATH="$VENV/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export _ROS_WHEELS_BOOTSTRAP_COMPLETE="${_ROS_WHEELS_BOOTSTRAP_COMPLETE:-}"
# A CI machine has no use for colcon's notification/desktop extensions.
export COLCON_EXTENSION_BLOCKLIST="${COLCON_EXTENSION_BLOCKLIST:-colcon_core.event_handler.desktop_notification}"

# Quiet by default; QTR_VERBOSE=1 streams the compiler output. On failure the log tail is printed.
EVENT_HANDLERS=(console_start_end+ console_direct-)
[[ "${QTR_VERBOSE:-0}" == "1" ]] && EVENT_HANDLERS=(console_start_end+ console_direct+)

cd "$REPO_ROOT"
set +e
"$VENV/bin/colcon" --log-base "$REPO_ROOT/log" build \
  --base-paths "$REPO_ROOT" \
  --build-base "$REPO_ROOT/build" \
  --install-base "$REPO_ROOT/install" \
  --event-handlers "${EVENT_HANDLERS[@]}" \
  --cmake-args \
    "-DPython3_EXECUTABLE=$PY" \
    "-DPython3_FIND_VIRTUALENV=ONLY" \
    -DBUILD_TESTING=OFF \
    -DCMAKE_BUILD_TYPE=Release \
  "$@"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  log="$REPO_ROOT/log/latest_build/q_transformer_ros/stdout_stderr.log"
  echo "colcon_build.sh: colcon build FAILED (exit $rc); last lines of $log:" >&2
  tail -n 60 "$log" >&2 || true
  exit "$rc"
fi
echo "colcon_build.sh: built into $REPO_ROOT/install"
