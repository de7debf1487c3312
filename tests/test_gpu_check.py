"""benchmarks/gpu_check.sh in its CPU dry-run mode: the GPU check's code paths (SFT and DPO through `stemqa`, the
4-bit generation, FAISS search, the per-step table) run and report what they measured, so the script works when
a GPU machine is lent. The GPU figures themselves need a GPU."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_check():
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    summary = json.loads(text[text.rindex("\n{\n") + 1:])
    assert summary["dry_run"] is True and summary["model"] == "tiny-qwen3"
    for stage in ("sft", "dpo"):
        steps = summary["train"][stage]["steps"]
        assert [s["step"] for s in steps] == [1, 2], stage
        assert all(s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["peak_mem_mb"] > 0 for s in steps), steps
        assert f"[{stage}] step 2:" in text  # the per-step line a user reads
    gen = summary["quant_generation"]
    assert gen["layer"] == "Linear4bit" and gen["new_tokens"] == 2 * 8 and gen["tokens_per_s"] > 0
    assert summary["faiss"]["top5_matches_exact"] is True and summary["faiss"]["queries"] == 1000
