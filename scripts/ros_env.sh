# Source me (bash): the environment for tests, the demo and `ros2 run`-style use of this repo.
#   source scripts/ros_env.sh
# Puts the repo's .venv (ROS 2 Kilted PyPI wheels, torch, ...) and the colcon install overlay
# (install/q_transformer_ros: our generated msg/srv, launchers, launch/ and config/) on the paths.
# Safe to source more than once; safe under `set -euo pipefail`. Builds nothing: see setup_env.sh.

_qtr_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_qtr_venv="${QTR_VENV:-$_qtr_root/.venv}"
_qtr_prefix="$_qtr_root/install/q_transformer_ros"

# _qtr_prepend VAR DIR: put DIR first in the colon list VAR, once.
_qtr_prepend() {
  local var="$1" dir="$2" cur="${!1:-}"
  case ":$cur:" in
    *":$dir:"*) cur=":$cur:"; cur="${cur//:$dir:/:}"; cur="${cur#:}"; cur="${cur%:}" ;;
  esac
  export "$var=$dir${cur:+:$cur}"
}

export QTR_REPO_ROOT="$_qtr_root"
export VIRTUAL_ENV="$_qtr_venv"
_qtr_prepend PATH "$_qtr_venv/bin"

# ROS 2 from the wheels (prefix = the venv), then our overlay on top.
export ROS_VERSION=2
export ROS_PYTHON_VERSION=3
export ROS_DISTRO="${ROS_DISTRO:-kilted}"
_qtr_prepend AMENT_PREFIX_PATH "$_qtr_venv"
_qtr_prepend CMAKE_PREFIX_PATH "$_qtr_venv"
_qtr_prepend LD_LIBRARY_PATH "$_qtr_venv/lib"
if [[ -d "$_qtr_prefix" ]]; then
  _qtr_prepend AMENT_PREFIX_PATH "$_qtr_prefix"
  _qtr_prepend CMAKE_PREFIX_PATH "$_qtr_prefix"
  _qtr_prepend LD_LIBRARY_PATH "$_qtr_prefix/lib"
  _qtr_pyver="$("$_qtr_venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3.11)"
  _qtr_prepend PYTHONPATH "$_qtr_prefix/lib/python$_qtr_pyver/site-packages"
  # the package's executables by name (convert_bag, train, record, policy_node, ...), as `ros2 run` would
  _qtr_prepend PATH "$_qtr_prefix/lib/q_transformer_ros"
  unset _qtr_pyver
else
  echo "ros_env.sh: no colcon install at $_qtr_prefix (run: bash scripts/colcon_build.sh);" \
       "q_transformer_ros.msg/srv and the lib/ executables are unavailable" >&2
fi

# Middleware and rendering: Fast DDS (the only RMW in the wheels), headless MuJoCo through EGL.
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
# Keep DDS traffic on this machine unless the caller says otherwise.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"

unset -f _qtr_prepend
unset _qtr_root _qtr_venv _qtr_prefix
