#!/usr/bin/env bash
# Kept for old command lines: the GPU suite is benchmarks/gpu_suite.py (its docstring says what
# it runs, how long it is expected to take and how that is estimated).
#
#   bash benchmarks/gpu_suite.sh [--dry-run | --full | ...] 2>&1 | tee gpu_suite.log
exec python3 "$(dirname "$0")/gpu_suite.py" "$@"
