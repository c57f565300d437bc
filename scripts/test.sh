#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, lint included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest-xdist workers, one per core up to 4 (each holds models and builds engines: memory),
# ARC_TEST_JOBS=N to choose (0: all in this process); a test file is a unit, so a file's module
# fixtures are built once, and the session's tiny engines once across workers (tests/conftest.py
# built_once). 2 cores (Intel Xeon, 2026-12-05): 888 s against 1249 s in one process
cores=$(nproc)
jobs=${ARC_TEST_JOBS:-$((cores < 4 ? cores : 4))}
.venv/bin/python -m pytest -q -ra --durations=15 -n "$jobs" --dist loadfile tests
