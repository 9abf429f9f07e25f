#!/usr/bin/env bash
# Set up (idempotent, fast when nothing changed) and run the whole test suite. THE test command:
#   bash scripts/run_tests.sh [extra pytest args, e.g. -k policy or test/core]
# Environment knobs:
#   QTR_RUN_SLOW=1        also run tests marked @pytest.mark.slow (default: skipped)
#   QTR_TEST_TIMEOUT=600  per-test timeout in seconds (pytest-timeout)
#   QTR_SKIP_SETUP=1      do not run scripts/setup_env.sh first
# Fails (non-zero exit) on any failed/errored test, and also when no test was collected.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

if [[ "${QTR_SKIP_SETUP:-0}" != "1" ]]; then
  bash scripts/setup_env.sh
fi
# shellcheck source=scripts/ros_env.sh
source scripts/ros_env.sh

marker_args=(-m "not slow")
[[ "${QTR_RUN_SLOW:-0}" == "1" ]] && marker_args=()

# -P: do not put the current directory first on sys.path, so q_transformer_ros is imported from the
# colcon install overlay (which also holds the generated msg/srv), exactly as a robot would run it.
set +e
# No path given: pytest runs setup.cfg's testpaths (test/); extra args may name files or -k filters.
python -P -m pytest \
  -q -ra \
  --timeout="${QTR_TEST_TIMEOUT:-600}" \
  "${marker_args[@]}" \
  "$@"
rc=$?
set -e

case "$rc" in
  0) echo "run_tests.sh: all tests passed" ;;
  5) echo "run_tests.sh: FAILED: pytest collected no tests (exit 5)" >&2; exit 5 ;;
  *) echo "run_tests.sh: FAILED: pytest exit code $rc" >&2; exit "$rc" ;;
esac
