#!/usr/bin/env bash
# THE main-job command on a fresh machine: set up (idempotent) and run the end-to-end demo.
#   bash scripts/run_demo.sh                 # full demo (~17 min on 2 idle CPU cores after set-up) -> ./demo_out
#   bash scripts/run_demo.sh --quick --out /tmp/demo_quick      # tiny smoke run (~1-2 min)
#   bash scripts/run_demo.sh --help          # every knob (tasks, episodes, training steps, stages, --force)
# Record (ROS: sim_node + expert_node + recorder) -> convert -> train (CPU) -> closed loop (ROS: sim_node +
# policy_node) -> report. Rerunning the same command resumes: finished stages are skipped.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
bash scripts/setup_env.sh
# shellcheck source=scripts/ros_env.sh
source scripts/ros_env.sh
# -P: import q_transformer_ros from the colcon install (next to the generated msg/), as a robot would.
exec python -P -m q_transformer_ros.demo "$@"
