#!/usr/bin/env bash
# Set up, compile SmolLM2-135M for this CPU with --target auto (the fastest installed CPU
# target: tvm after setup.sh, else torch), and generate from the engine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/arc compile smollm2-135m --target auto -O2 -o smol.arc
.venv/bin/arc run smol.arc --prompt "Write a Python function that checks if a number is prime." --stream
