#!/usr/bin/env bash
# GPU checks on a machine that carries its own CUDA torch and reaches no package registry (the
# device machines of docs/ARCHITECTURE.md "CUDA"): arc is put on PYTHONPATH as a package tree
# (no pip install, the machine's torch is used), the wheels in .gpu/whl are installed beside it,
# and the smollm2 GGUF is assembled from .gpu/gguf.part* when present.
#   bash scripts/gpu_check.sh tests     # the CUDA tests (tiny-llama)
#   bash scripts/gpu_check.sh bench     # benchmarks/gpu_speed.py on smollm2-135m
#   bash scripts/gpu_check.sh diag      # why AOTInductor CUDA packages crash (cuda-gdb first)
# Logs go to $OUT (default /tmp/arc-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/arc-gpu}
SITE=/tmp/arc-site
mkdir -p "$OUT" "$SITE"
rm -rf "$SITE/arc" && mkdir -p "$SITE/arc"
cp -r arc/. "$SITE/arc/" && cp -r passes "$SITE/arc/passes" && cp -r targets "$SITE/arc/targets"
cp -r models "$SITE/arc/models"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" .gpu/whl/*.whl
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ARC_CACHE=${ARC_CACHE:-/tmp/arc-cache} TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
GGUF="$ARC_CACHE/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# one part per call (a call carries at most 64 MiB); /tmp outlives calls on a warm machine
mkdir -p /tmp/arc-parts && cp .gpu/gguf.part* /tmp/arc-parts/ 2>/dev/null
if [ ! -f "$GGUF" ] && [ -f /tmp/arc-parts/gguf.part00 ] && [ -f /tmp/arc-parts/gguf.part01 ]; then
  mkdir -p "$(dirname "$GGUF")" && cat /tmp/arc-parts/gguf.part0[01] > "$GGUF.tmp"
  if [ "$(sha256sum < "$GGUF.tmp" | cut -d' ' -f1)" = "$SHA" ]; then mv "$GGUF.tmp" "$GGUF"
  else echo "GGUF parts do not add up to the file"; rm -f "$GGUF.tmp"; fi
fi
ls -la "$GGUF" 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name())"
case "${1:-tests}" in
  tests)
    # from /tmp: `python -m` puts the working directory first on sys.path, and the repo's own
    # arc/ lacks the passes/targets/models subpackages that $SITE/arc has
    REPO=$PWD
    cd /tmp && timeout "${TEST_TIMEOUT:-420}" python3 -m pytest --rootdir "$REPO" -q -x -p no:cacheprovider --import-mode=append -m gpu \
      "$REPO/tests/e2e/test_cuda.py" "$REPO/tests/targets/test_torch_target.py" 2>&1 | tee "$OUT/tests.log"
    ;;
  diag)
    timeout "${DIAG_TIMEOUT:-540}" python3 scripts/gpu_diag_aoti.py
    ;;
  bench)
    shift
    REPO=$PWD
    cd /tmp && timeout "${BENCH_TIMEOUT:-540}" python3 "$REPO/benchmarks/gpu_speed.py" --json "$OUT/gpu_speed.json" \
      "$@" 2>&1 | tee "$OUT/bench.log"
    ;;
esac
