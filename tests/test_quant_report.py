"""`stemqa quant report` on the tiny Qwen3: a measured row (int8 weight-only, quantized and measured in fresh
processes) and a row this machine "cannot run" (bitsandbytes hidden) that says why instead of disappearing;
checks the CSV, markdown and PNG the report writes."""
from __future__ import annotations

import csv
import sys

import pytest

from PIL import Image

from stemqa.cli import main as cli_main


@pytest.mark.slow  # one spawned process per row: minutes on 2 CPUs
def test_quant_report_writes_table_and_figure(tiny_model, tmp_path, monkeypatch, capsys):
    # Hidden from this (the parent) process, where the report checks what each row needs.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from stemqa.quant.report import report

    out = tmp_path / "report"
    res = report(tiny_model, out, ["int8-weight", "bnb-4bit"], n_mmlu=3, n_arc=3, group_size=32, gen_tokens=3,
                 gen_batch=2, full_precision=False, command="stemqa quant report (test)")
    rows = list(csv.DictReader(open(res["paths"]["csv"])))
    assert [r["setting"] for r in rows] == ["int8-weight", "bnb-4bit"]
    int8, bnb = rows
    assert int8["method"] == "int8-weight" and int8["bits"] == "8" and not int8["note"]
    for key in ("mmlu_stem_acc", "arc_easy_acc"):
        k = float(int8[key]) * 3  # k of 3 questions right (the CSV rounds to 4 decimals)
        assert 0 <= k <= 3 and abs(k - round(k)) < 1e-3
    assert float(int8["size_mb"]) > 1 and float(int8["quant_wall_s"]) > 0 and float(int8["quant_cpu_s"]) > 0
    assert float(int8["peak_mem_mb"]) > 100 and int8["mem_kind"] == "RSS"  # a Python process with torch
    assert float(int8["tok_s_b1"]) > 0 and float(int8["tok_s_bN"]) > 0 and int8["gen_batch"] == "2"
    assert bnb["note"].startswith("cannot run on this machine: missing the Python package 'bitsandbytes'")
    assert bnb["mmlu_stem_acc"] == "" and bnb["peak_mem_mb"] == ""
    md = open(res["paths"]["md"]).read()
    assert "| int8-weight | " in md and "| bnb-4bit |" in md and "cannot run on this machine" in md
    assert "stemqa quant report (test)" in md and "3 MMLU-STEM + 3 ARC-Easy" in md
    png = Image.open(res["paths"]["png"])
    assert png.format == "PNG" and png.size[0] > 500
    assert not (out / "models").exists() or not any((out / "models").iterdir())  # models removed by default


def test_quant_cli_rejects_an_unknown_setting(capsys):
    try:
        rc = cli_main(["quant", "report", "--settings", "gptq-w4,awq-w4", "--out", "/nonexistent/never"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "unknown quantization setting(s) ['awq-w4']" in capsys.readouterr().err
