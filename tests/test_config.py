"""The config tree: presets load, every field is documented, bad names and values fail with their YAML path."""
import subprocess
import sys
from functools import reduce

import pytest

from stemqa.config import ConfigError, StemqaConfig, available_presets, load_config, to_yaml
from stemqa.config.load import dump_schema


def test_presets_load_with_the_seed_settings():
    assert {"demo", "qwen3-0.6b"} <= set(available_presets())
    demo = load_config("demo")
    assert demo.model.name == "smollm2-135m-instruct" and demo.preset == "demo"
    q = load_config("qwen3-0.6b")
    assert q.model.name == "Qwen/Qwen3-0.6B-Base"
    assert q.sft.lr == 1e-5 and q.dpo.beta == 0.1
    assert (q.sft.lora.r, q.sft.lora.alpha, q.sft.lora.dropout, q.sft.lora.target_modules) == (16, 32, 0.05, ["q_proj", "v_proj"])
    assert q.quant.group_size == 64 and q.rag.embed.embedder == "thenlper/gte-large" and q.rag.top_k == 5


def test_every_field_is_documented():
    undocumented = [line for line in dump_schema() if line.rstrip().endswith(":") and "(" in line]
    assert not undocumented, undocumented
    assert any(line.startswith("sft.lora") for line in dump_schema()) or "sft.lora" in "\n".join(dump_schema())


def test_unknown_field_names_its_yaml_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: demo\nsft:\n  resources:\n    zero_stag: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "sft.resources.zero_stag: unknown field" in str(e.value)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("override, path", [
    ("sft.lr=-1", "sft.lr"), ("dpo.loss=hinge", "dpo.loss"), ("sft.resources.zero_stage=5", "sft.resources.zero_stage"),
    ("rag.top_k=0", "rag.top_k"), ("serve.port=notaport", "serve.port"), ("eval.scoring=bleu", "eval.scoring"),
])
def test_bad_values_name_the_field(override, path):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert f"  {path}:" in str(e.value)


def test_stem_names_the_fixed_mmlu_stem_subjects(tmp_path):
    """`subjects: stem` is the splits' subject list; anything else that is not a list is an error naming the field."""
    from stemqa.data.splits import MMLU_STEM_SUBJECTS

    f = tmp_path / "c.yaml"
    body = "base: demo\neval:\n  sets:\n    - name: m\n      sources:\n        - {path: mcq/mmlu/test, format: mmlu_csv, subjects: %s}\n"
    f.write_text(body % "stem")
    assert load_config(str(f)).eval.sets[0].sources[0].subjects == list(MMLU_STEM_SUBJECTS)
    f.write_text(body % "stme")
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    assert "eval.sets.0.sources.0.subjects" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="neither a config file nor a preset"):
        load_config(str(tmp_path / "nope.yaml"))


def test_file_extends_a_preset_and_round_trips(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base: demo\nname: mine\nsft: {lr: 3.0e-4}\n")
    cfg = load_config(str(f), ["dpo.beta=0.13"])
    assert (cfg.name, cfg.sft.lr, cfg.dpo.beta, cfg.model.name) == ("mine", 3e-4, 0.13, "smollm2-135m-instruct")
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(str(again)) == cfg
    assert StemqaConfig.model_validate(cfg.model_dump()) == cfg


def test_cli_reports_config_errors_in_one_line():
    out = subprocess.run([sys.executable, "-m", "stemqa.cli", "config", "--set", "sft.lr=abc"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "sft.lr:" in out.stderr and "Traceback" not in out.stderr


def test_qwen3_preset_runs_the_study_recipe():
    """Issue 23: the GPU preset trains and chooses as `study` does (its own model, hyperparameters and resources).
    That its eval sets are exactly the fixed report sets is test_splits.py::test_preset_eval_sets_are_the_fixed_sets."""
    q, s = load_config("qwen3-0.6b"), load_config("study")
    assert q.data.train == s.data.train and q.data.preference == s.data.preference
    assert q.sft.data == s.sft.data == "qa"
    assert q.select.modes == s.select.modes and q.select.dev_limit is s.select.dev_limit is None
    assert [e.name for e in q.eval.sets] == [e.name for e in s.eval.sets]
    assert {src.split for e in q.eval.sets for src in e.sources} == {"report"}


def test_qwen3_cpu_check_keeps_the_preset_recipe():
    """tests/configs/qwen3-cpu.yaml (the preset's whole pipeline on CPU, README "GPU install") changes what the
    hardware decides and the run's length, nothing the recipe is made of."""
    q, c = load_config("qwen3-0.6b"), load_config("tests/configs/qwen3-cpu.yaml")
    assert c.model.name == "tiny-qwen3" and not c.sft.resources.use_gpu and not c.dpo.resources.use_gpu
    recipe = ["data", "filter.threshold", "filter.targets", "sft.data", "sft.lr", "sft.lora", "sft.batch_size",
              "sft.grad_accum", "sft.resources.zero_stage", "dpo.loss", "dpo.beta", "dpo.lr", "dpo.resources.zero_stage",
              "quant.method", "quant.bits", "quant.group_size", "rag.corpus", "rag.index", "rag.top_k",
              "eval.scoring", "eval.num_fewshot", "eval.models", "eval.sets", "select.modes", "select.dev_sets"]
    for path in recipe:
        assert reduce(getattr, path.split("."), c) == reduce(getattr, path.split("."), q), path
