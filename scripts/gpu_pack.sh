#!/usr/bin/env bash
# Put in .gpu/ (git-ignored through .git/info/exclude) what scripts/gpu_check.sh needs on a GPU
# machine that reaches no registry: the `gguf` wheel (.gpu/whl) and the SmolLM2 GGUF split in
# two parts of < 64 MiB (.gpu/gguf.part00, .gpu/gguf.part01), carried one per call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')
.venv/bin/pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  -d .gpu/whl "gguf==$version"
gguf=$(.venv/bin/python -c 'from arc.models.catalog import _smollm2_gguf; print(_smollm2_gguf())')
rm -f .gpu/gguf.part*
split -b 49500000 -d -a 2 "$gguf" .gpu/gguf.part
ls -la .gpu .gpu/whl
