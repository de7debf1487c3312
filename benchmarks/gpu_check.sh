#!/usr/bin/env bash
# The GPU checks (benchmarks/gpu_check.py) from a fresh checkout on one GPU machine, in under 8 minutes:
#   bash benchmarks/gpu_check.sh [--write]   installs .venv-gpu (torch 2.13.0 from PyPI: the CUDA build; the project
#                                            with the gpu extra: faiss-gpu instead of faiss-cpu), runs the checks
#   bash benchmarks/gpu_check.sh --dry-run   on CPU with the project's .venv: the same code paths on tiny-qwen3
# GPU_CHECK_PYTHON=/path/to/python skips the install (an environment that already has CUDA torch and the extra).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ " $* " == *" --dry-run "* ]]; then
  exec "${GPU_CHECK_PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
fi
PY="${GPU_CHECK_PYTHON:-}"
if [ -z "$PY" ]; then
  command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi; use --dry-run on a CPU machine" >&2; exit 2; }
  [ -x .venv-gpu/bin/python ] || python3 -m venv .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==2.13.0"            # PyPI's Linux wheel is the CUDA build
  "$PY" -m pip install -q -e ".[gpu]"
  "$PY" -m pip uninstall -q -y faiss-cpu || true      # faiss-gpu provides the same `faiss` module
  "$PY" -m pip install -q --force-reinstall --no-deps "faiss-gpu==1.15.1"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" benchmarks/gpu_check.py "$@"
