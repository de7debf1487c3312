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


def test_quant_report_resume_keeps_finished_rows_and_refuses_other_settings(tiny_model, tmp_path):
    """An interrupted report's finished rows are kept by --resume (nothing re-measured, so no process is
    spawned here); a partial report measured with other settings, or a corrupt line, is refused by name."""
    import json

    from stemqa.quant.report import PARTIAL, PARTIAL_ARGS, Row, measure_rows

    sets = {"mmlu_stem": [object()] * 3, "arc_easy": [object()] * 2}
    measuring = {"model": tiny_model, "questions": {"mmlu_stem": 3, "arc_easy": 2}, "calib_pool": 4, "threads": 2,
                 "gen_tokens": 3, "gen_batch": 2}
    earlier = {"setting": "full precision", "method": "none", "mmlu_stem_acc": 0.5, "tok_s_b1": 9.0}
    (tmp_path / PARTIAL).write_text(json.dumps(earlier) + "\n")
    (tmp_path / PARTIAL_ARGS).write_text(json.dumps(measuring))
    logged = []
    rows = measure_rows(tiny_model, [Row("full precision", None)], sets, [None] * 4, tmp_path, threads=2,
                        gen_tokens=3, gen_batch=2, log=logged.append, resume=True)
    assert rows == [earlier] and logged == ["kept from the interrupted report: full precision"]
    assert (tmp_path / PARTIAL).read_text() == json.dumps(earlier) + "\n"  # still there for the next resume

    with pytest.raises(ValueError, match="cannot resume from .*partial.*run without --resume"):
        measure_rows(tiny_model, [Row("full precision", None)], sets, [None] * 4, tmp_path, threads=2,
                     gen_tokens=3, gen_batch=4, log=logged.append, resume=True)  # another generation batch
    (tmp_path / PARTIAL).write_text(json.dumps(earlier) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"partial.jsonl, line 2: not JSON"):
        measure_rows(tiny_model, [Row("full precision", None)], sets, [None] * 4, tmp_path, threads=2,
                     gen_tokens=3, gen_batch=2, log=logged.append, resume=True)
