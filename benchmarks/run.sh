#!/usr/bin/env bash
# Benchmarks and slow tests. Each bench_*.py prints its figures and updates its section of BENCHMARKS.md.
#   bash benchmarks/run.sh            all benchmarks, then the slow tests
#   bash benchmarks/run.sh eval       only benchmarks/bench_eval.py
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then
  for name in "$@"; do .venv/bin/python "benchmarks/bench_${name}.py"; done
  exit 0
fi
for f in benchmarks/bench_*.py; do
  echo "== $f"; .venv/bin/python "$f"
done
echo "== slow tests (also in ./run.sh test)"; .venv/bin/python -m pytest -q -m slow
