"""Quality: which lever lifts which answer mode of SmolLM2-135M-Instruct, on questions never trained on.

    python benchmarks/bench_quality.py eval  --tag base                          # a model on dev, every mode
    python benchmarks/bench_quality.py sft   --tag qa_arc --pool arc --data qa   # `stemqa sft`, then eval on dev
    python benchmarks/bench_quality.py dpo   --tag dpo1 --start qa_arc --pairs mcq --beta 0.1 --lr 1e-6
    python benchmarks/bench_quality.py table                                     # dev table of every run so far
    python benchmarks/bench_quality.py report --candidates base,qa_arc,dpo1      # select on dev, report sets,
                                                                                 # BENCHMARKS.md "Quality"
    python benchmarks/bench_quality.py rag   --candidates base,qa_all            # dev without / with passages

Training runs go through the pipeline's own entry points (`stemqa sft` / `stemqa dpo`: Ray Train + DeepSpeed,
the `study` preset plus --set overrides), so a recipe found here is what the pipeline runs. Evaluation is the one
scorer (stemqa.eval) in every answer mode: each mode is fitted on the pooled dev sets (temperature, PriDe prior,
"unsure" threshold: stemqa.eval.fit.fit_mode) and those dev predictions are the dev figures. Splits are
stemqa.data.splits (fixed in code): dev = ARC-Easy dev, ARC-Challenge dev, a hashed share of the MMLU STEM even
rows; report = ARC-Easy test, a hashed third of ARC-Challenge train held out from training, another hashed share
of MMLU STEM. `report` picks the (model, mode) on dev (stemqa.eval.select), scores the report sets only for the
base model's best mode and the selected ones, and writes the section from that run's numbers.

Everything lands under benchmarks/out/quality (git-ignored): models/<tag>, evals/<tag>/<dev key>/<mode>/<set>,
and runs.jsonl, one line per run (config, wall time, dev figures), so an interrupted series loses nothing.
The CPU is shared with other jobs: wall times come with the 1-minute load average and are not speed figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see `stemqa()` below

OUT = ROOT / "benchmarks" / "out" / "quality"
BASE = "smollm2-135m-instruct"
MODES = ["letter", "cloze", "cloze_question", "letter_debiased", "permute"]
SECTION = "## Quality: answer modes and training levers"

# Training pools (training-side questions only: `split: train` in the study preset). Names used by --pool.
POOLS = {
    "arc": ["arc_easy", "arc_challenge", "ai2_8th", "ai2_elem"],
    "arc_qasc": ["arc_easy", "arc_challenge", "ai2_8th", "ai2_elem", "qasc"],
    "all": ["arc_easy", "arc_challenge", "ai2_8th", "ai2_elem", "qasc", "mmlu"],
    "mmlu": ["mmlu"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> float:
    return round(os.getloadavg()[0], 1)


def record(entry: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    entry = {"date": time.strftime("%Y-%m-%d %H:%M"), **entry}
    with open(OUT / "runs.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


def runs() -> list[dict]:
    path = OUT / "runs.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def trained(tag: str, kind: str) -> bool:
    """A finished training run of `tag`: recorded in runs.jsonl once `stemqa` returned. Not the model directory
    alone: DPO writes its best model so far at each validation, so a crashed run leaves one behind."""
    return (OUT / "models" / tag / "model" / "config.json").exists() and \
        any(r.get("tag") == tag and r.get("kind") == kind for r in runs())


def study_config(overrides=()):
    from stemqa.config import load_config

    return load_config("study", list(overrides))


def data_root():
    from stemqa.data.paths import data_root as resolve

    return resolve("auto")


# --- data -------------------------------------------------------------------------------------------------------
def held_out(part: str, limit: Optional[int] = None) -> dict:
    """{set name: questions} of the dev or report sets; `limit`: a fixed hashed subset of each (screening)."""
    from stemqa.data.splits import DEV_SETS, REPORT_SETS, load_held_out, share

    names = DEV_SETS if part == "dev" else REPORT_SETS
    out = {}
    for name in names:
        qs = load_held_out(name, data_root())
        if limit:
            qs = sorted(qs, key=lambda q: share("subset/" + q.id))[:limit]
        out[name] = qs
    return out


def training_pool(pool: str, limit: Optional[int]) -> Path:
    """The pool's training-side MCQ records (the study preset's sources), written once; a hashed subset of `limit`."""
    from stemqa.data.mcq import load_sources, write_records
    from stemqa.data.splits import share

    cfg = study_config()
    sources = [s for s in cfg.data.train if s.name in POOLS[pool]]
    records, _ = load_sources(sources, data_root())
    if limit:
        records = sorted(records, key=lambda q: share("pool/" + q.id))[:limit]
    path = OUT / "pools" / f"{pool}_{limit or 'all'}.jsonl"
    write_records(records, path)
    return path


# --- evaluation -------------------------------------------------------------------------------------------------
def dev_key(limit: Optional[int]) -> str:
    return f"dev{limit}" if limit else "dev"


def model_path(tag: str) -> str:
    return BASE if tag == "base" else str(OUT / "models" / tag / "model")


def eval_dev(tag: str, modes: list[str], limit: Optional[int] = None, threads: int = 1) -> dict:
    """Fit and score every mode on the pooled dev sets; per set metrics + predictions; returns {mode: {set: acc}}."""
    import torch

    from stemqa.eval.fit import fit_mode
    from stemqa.eval.run import load_scorer

    torch.set_num_threads(threads)
    sets = held_out("dev", limit)
    pooled = [q for qs in sets.values() for q in qs]
    scorer, figures = None, {}
    for mode in modes:
        d = OUT / "evals" / tag / dev_key(limit) / mode
        if (d / "calibration.json").exists():
            figures[mode] = json.loads((d / "calibration.json").read_text())["accuracy"]
            continue
        scorer = scorer or load_scorer(model_path(tag), batch_size=16)
        t0 = time.perf_counter()
        l0 = load()
        fitted_on = f"{dev_key(limit)}: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items())
        if mode == "letter_debiased":
            params, cal, preds = debiased_from_letter(scorer, tag, limit, sets, fitted_on, threads)
        else:
            params, cal, preds = fit_mode(scorer, mode, pooled, model=tag, fitted_on=fitted_on)
        figures[mode] = save_mode(d, tag, mode, sets, params, cal, preds, time.perf_counter() - t0, l0)
    for mode in modes:  # lm-eval's acc beside acc_norm: the same forward passes, another normalisation
        if mode.startswith("cloze") and not mode.endswith("_acc"):
            figures[mode + "_acc"] = derive_acc(tag, limit, mode, sets)
    return figures


PRIOR_QUESTIONS = 300  # PriDe's prior from k cyclic permutations of this many dev questions (hashed, all sets)


def debiased_from_letter(scorer, tag: str, limit: Optional[int], sets: dict, fitted_on: str, threads: int):
    """letter_debiased: the PriDe prior from PRIOR_QUESTIONS dev questions (no labels), applied to the letter
    mode's saved log-likelihoods of every dev question (the letter mode is scored first when missing)."""
    from stemqa.data.splits import share
    from stemqa.eval.fit import fit_from_predictions, fit_letter_prior, rescored
    from stemqa.eval.modes import ModeParams
    from stemqa.eval.select import read_predictions

    letter = OUT / "evals" / tag / dev_key(limit) / "letter"
    if not (letter / "calibration.json").exists():
        eval_dev(tag, ["letter"], limit, threads)
    pooled = [q for qs in sets.values() for q in qs]
    sample = sorted(pooled, key=lambda q: share("prior/" + q.id))[:PRIOR_QUESTIONS]
    params = ModeParams(mode="letter_debiased", letter_prior=fit_letter_prior(scorer, sample))
    preds = [p for name in sets for p in read_predictions(letter / name / "predictions.jsonl")]
    return fit_from_predictions(params, rescored(preds, params, [q.choices for q in pooled]), model=tag,
                                fitted_on=f"{fitted_on}; prior from {len(sample)} of them, labels unused")


def save_mode(d: Path, tag: str, mode: str, sets: dict, params, cal, preds, wall: float, l0: float) -> dict:
    """Write a fitted mode's params, per-set predictions and metrics, and calibration.json; returns accuracies."""
    from stemqa.eval.fit import save_fitted_mode

    accs = save_fitted_mode(d, tag, mode, sets, params, cal, preds, {"wall_s": wall, "load": [l0, load()]})
    log(f"{tag} {mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()) +
        f"; ECE {cal.ece_before:.3f} -> {cal.ece_after:.3f} (T={cal.temperature:.3f}); {wall:.0f} s")
    return accs


def derive_acc(tag: str, limit: Optional[int], mode: str, sets: dict) -> dict:
    """The `<mode>_acc` variant (no length normalisation) from `mode`'s saved log-likelihoods."""
    from stemqa.eval.fit import fit_from_predictions, rescored
    from stemqa.eval.modes import as_params
    from stemqa.eval.select import read_predictions

    src = OUT / "evals" / tag / dev_key(limit) / mode
    d = src.parent / f"{mode}_acc"
    if (d / "calibration.json").exists():
        return json.loads((d / "calibration.json").read_text())["accuracy"]
    params = as_params(f"{mode}_acc")
    preds, choices = [], []
    for name, qs in sets.items():
        preds += read_predictions(src / name / "predictions.jsonl")
        choices += [q.choices for q in qs]
    fitted, cal, out = fit_from_predictions(params, rescored(preds, params, choices), model=tag,
                                            fitted_on=json.loads((src / "mode_params.json").read_text())["fitted_on"])
    return save_mode(d, tag, f"{mode}_acc", sets, fitted, cal, out, 0.0, load())


def eval_report(tag: str, mode: str, limit: Optional[int] = None, dev_limit: Optional[int] = None,
                threads: int = 1) -> dict:
    """Score the report sets in `mode` with the parameters fitted on dev; returns {set: accuracy}."""
    import torch

    from stemqa.eval.modes import ModeParams
    from stemqa.eval.run import evaluate, load_scorer

    torch.set_num_threads(threads)
    params = ModeParams.load(OUT / "evals" / tag / dev_key(dev_limit) / mode / "mode_params.json")
    scorer, out = None, {}
    for name, qs in held_out("report", limit).items():
        d = OUT / "evals" / tag / f"report{limit or ''}" / mode / name
        if (d / "metrics.json").exists():
            out[name] = json.loads((d / "metrics.json").read_text())["accuracy"]
            continue
        scorer = scorer or load_scorer(model_path(tag), batch_size=16)
        m = evaluate(model_path(tag), qs, d, scoring=params, scorer=scorer, data_desc=name, progress=False)
        log(f"{tag} {mode} {name}: {m['accuracy']:.3f} (n={m['n']}, {m['time_s']:.0f} s)")
        out[name] = m["accuracy"]
    return out


# --- training ---------------------------------------------------------------------------------------------------
def stemqa(args: list[str]) -> tuple[dict, float]:
    """Run a `stemqa` CLI command; returns its final JSON output and wall seconds."""
    t0 = time.perf_counter()
    # Ray starts its workers at nice 15: on this shared machine the Train worker then got ~5% of a core beside
    # normal-priority processes (this script's own evaluation included). Same priority as everything else here.
    # OpenMP threads spin at their barriers: with other jobs on the 2 cores, a 2-thread step spent 60% of its CPU
    # time in libgomp's spin-wait (py-spy) and ran 5x slower per CPU second; the runs here use one thread
    # (--train-cpus 1) and passive waits.
    env = {**os.environ, "RAY_worker_niceness": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "stemqa"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stemqa {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    start = proc.stdout.rfind("\n{")
    return json.loads(proc.stdout[start + 1 if start >= 0 else 0:]), wall


def sets_flags(pairs: list[str]) -> list[str]:
    return [x for kv in pairs for x in ("--set", kv)]


def cmd_sft(a) -> None:
    out = OUT / "models" / a.tag
    overrides = [f"sft.data={a.data}", f"sft.lr={a.lr}", f"sft.epochs={a.epochs}", *a.set,
                 f"sft.resources.cpus_per_worker={a.train_cpus}"]
    if a.steps:
        overrides.append(f"sft.max_steps={a.steps}")
    if not trained(a.tag, "sft"):
        train = training_pool(a.pool, a.limit)
        l0 = load()
        log(f"sft {a.tag}: {train.name}, {' '.join(overrides)}")
        res, wall = stemqa(["sft", "--config", "study", "--train", str(train), "--out", str(out),
                            "--model", model_path(a.start), *sets_flags(overrides)])
        m = res["metrics"]
        shutil.rmtree(out / "ray", ignore_errors=True)  # checkpoints with optimizer state: GBs per run
        record({"tag": a.tag, "kind": "sft", "start": a.start, "pool": a.pool, "limit": a.limit,
                "overrides": overrides, "wall_s": round(wall), "load": [l0, load()],
                "train_samples": m.get("train_samples"), "steps": m.get("steps"),
                "eval_loss_before": m.get("eval_loss_before"), "eval_loss": m.get("eval_loss"),
                "train_s": round(m.get("train_s", 0))})
        log(f"sft {a.tag}: {m.get('steps')} steps, eval loss {m.get('eval_loss_before'):.3f} -> "
            f"{m.get('eval_loss'):.3f}, {wall:.0f} s")
    figures = eval_dev(a.tag, a.modes.split(","), a.dev_limit, a.threads)
    record({"tag": a.tag, "kind": "eval", "dev": dev_key(a.dev_limit), "figures": figures})


PAIR_SOURCES = {
    "mcq": lambda cfg: [s for s in cfg.data.preference if s.startswith("mcq:")],
    "mcq_arc": lambda cfg: [s for s in cfg.data.preference if s.startswith("mcq:") and "mmlu" not in s],
    "aqua": lambda cfg: [s for s in cfg.data.preference if s.startswith("aqua")],
}


def cmd_dpo(a) -> None:
    from stemqa.data.preference import prepare_pairs
    from stemqa.models.loader import load_tokenizer

    out = OUT / "models" / a.tag
    overrides = [f"dpo.beta={a.beta}", f"dpo.lr={a.lr}", f"dpo.loss={a.loss}", *a.set,
                 f"dpo.resources.cpus_per_worker={a.train_cpus}", f"dpo.ref_cpus={a.train_cpus}"]
    if a.steps:
        overrides.append(f"dpo.max_steps={a.steps}")
    if a.pairs_n:
        overrides.append(f"dpo.split_sizes=[{a.pairs_n},{max(a.pairs_n // 20, 100)},{max(a.pairs_n // 20, 100)}]")
    if not trained(a.tag, "dpo"):
        cfg = study_config(overrides)
        sources = [s for name in a.pairs.split(",") for s in PAIR_SOURCES[name](cfg)]
        pairs_dir = out / "pairs"
        prep = prepare_pairs(sources, data_root(), load_tokenizer(model_path(a.start)), cfg.dpo, pairs_dir)
        l0 = load()
        log(f"dpo {a.tag}: {prep['counts']['train']} train pairs from {a.pairs}, {' '.join(overrides)}")
        res, wall = stemqa(["dpo", "--config", "study", "--pairs", str(pairs_dir), "--out", str(out),
                            "--model", model_path(a.start), *sets_flags(overrides)])
        m = res["metrics"]
        shutil.rmtree(out / "ray", ignore_errors=True)
        keep = ("steps", "val_reward_accuracy_before", "val_reward_accuracy_best", "best_step",
                "test_reward_accuracy", "test_reward_margin", "test_pairs", "train_pairs")
        record({"tag": a.tag, "kind": "dpo", "start": a.start, "pairs": a.pairs, "overrides": overrides,
                "wall_s": round(wall), "load": [l0, load()], **{k: m.get(k) for k in keep}})
        log(f"dpo {a.tag}: " + ", ".join(f"{k} {m.get(k)}" for k in keep) + f", {wall:.0f} s")
        honest = dev_pair_rewards(a.tag, a.start, study_config(overrides).dpo, a.dev_limit)
        record({"tag": a.tag, "kind": "dpo_dev_pairs", **honest})
        log(f"dpo {a.tag} on dev answer pairs: {honest}")
    figures = eval_dev(a.tag, a.modes.split(","), a.dev_limit, a.threads)
    record({"tag": a.tag, "kind": "eval", "dev": dev_key(a.dev_limit), "figures": figures})


def pair_logps(model: str, pairs, dpo) -> dict:
    """Summed log-probs of each pair's chosen and rejected completion (the DPO stage's own encoding)."""
    import torch

    from stemqa.models import load_causal_lm, load_tokenizer
    from stemqa.train.dpo import collate_pairs, encode_pair, sequence_logps

    torch.set_num_threads(1)
    m, tok = load_causal_lm(model), load_tokenizer(model)
    out = {}
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            part = pairs[i:i + 16]
            c, r, _, _ = sequence_logps(m, collate_pairs([encode_pair(tok, p, dpo.max_len) for p in part],
                                                         tok.pad_token_id))
            out.update({p.id: {"chosen_logp": float(x), "rejected_logp": float(y)} for p, x, y in zip(part, c, r)})
    return out


def dev_pair_rewards(tag: str, start: str, dpo, limit: Optional[int]) -> dict:
    """The honest DPO figure: on answer pairs built from *dev* questions (never trained by SFT or DPO), how often
    the DPO model's implicit reward ranks the right answer first (reward accuracy against its reference, the start
    model), and how often each model gives the right answer's text the higher likelihood."""
    from stemqa.data.preference import mcq_pair
    from stemqa.train.dpo import reward_accuracy

    pairs = [mcq_pair(q, "dev") for qs in held_out("dev", limit).values() for q in qs]
    pol, ref = pair_logps(model_path(tag), pairs, dpo), pair_logps(model_path(start), pairs, dpo)
    rew = reward_accuracy(pol, ref, dpo.beta)
    prefers = lambda d: sum(v["chosen_logp"] > v["rejected_logp"] for v in d.values()) / len(d)  # noqa: E731
    return {"dev_pairs": len(pairs), "dev_reward_accuracy": rew["reward_accuracy"],
            "dev_reward_margin": rew["reward_margin"], "dev_prefers_right_dpo": prefers(pol),
            "dev_prefers_right_start": prefers(ref)}


def cmd_eval(a) -> None:
    figures = eval_dev(a.tag, a.modes.split(","), a.dev_limit, a.threads)
    record({"tag": a.tag, "kind": "eval", "dev": dev_key(a.dev_limit), "figures": figures})


def cmd_table(a) -> None:
    rows = []
    for d in sorted((OUT / "evals").glob("*/dev*/*/calibration.json")):
        tag, key, mode = d.parts[-4], d.parts[-3], d.parts[-2]
        c = json.loads(d.read_text())
        rows.append((key, tag, mode, c["accuracy"], c["ece_before"], c["ece_after"]))
    names = sorted({k for *_, acc, _, _ in rows for k in acc})
    print(f"{'dev':<8} {'model':<24} {'mode':<16} " + " ".join(f"{n[:18]:>18}" for n in names) + "  ECE before/after")
    for key, tag, mode, acc, e0, e1 in rows:
        print(f"{key:<8} {tag:<24} {mode:<16} " + " ".join(f"{acc.get(n, float('nan')):>18.3f}" for n in names)
              + f"  {e0:.3f}/{e1:.3f}")


# --- selection, report sets, model card, BENCHMARKS.md -------------------------------------------------------------
def dev_candidates(tags: list[str]):
    """Every (model, mode) evaluated on the full dev sets, as selection candidates."""
    from stemqa.data.splits import DEV_SETS
    from stemqa.eval.select import load_candidate

    out = []
    for tag in tags:
        for mode_dir in sorted((OUT / "evals" / tag / "dev").glob("*/calibration.json")):
            d = mode_dir.parent
            out.append(load_candidate(tag, d.name, {s: d / s for s in DEV_SETS}, str(d / "mode_params.json")))
    return out


def calibration_of(tag: str, mode: str):
    from stemqa.eval.calibration import Calibration

    return Calibration.from_dict(json.loads((OUT / "evals" / tag / "dev" / mode / "calibration.json").read_text()))


def cmd_report(a) -> None:
    """Select on dev, score the report sets for the base's best mode and each model's best dev mode, write the
    model card and BENCHMARKS.md "Quality"."""
    from stemqa.data.splits import DEV_SETS, REPORT_SETS
    from stemqa.eval.card import CardInputs, write_model_card
    from stemqa.eval.select import read_predictions, select_best

    l0 = load()
    t0 = time.perf_counter()
    tags = a.candidates.split(",")
    sel = select_best(dev_candidates(tags))
    sel.save(OUT / "selection.json")
    log(sel.reason)
    best_per_model = {}
    for s in sel.scores:  # best first
        best_per_model.setdefault(s.model, s)
    to_report = [(s.model, s.mode) for s in best_per_model.values()]
    for model, mode in to_report:
        eval_report(model, mode, a.report_limit, threads=a.threads)
    results, calib = {}, {}
    for s in sel.scores:
        d = OUT / "evals" / s.model / "dev" / s.mode
        r = {name: read_predictions(d / name / "predictions.jsonl") for name in DEV_SETS}
        if (s.model, s.mode) in to_report:
            rd = OUT / "evals" / s.model / f"report{a.report_limit or ''}" / s.mode
            r.update({name: read_predictions(rd / name / "predictions.jsonl") for name in REPORT_SETS})
        results[(s.model, s.mode)] = r
        calib[(s.model, s.mode)] = calibration_of(s.model, s.mode)
    trained = {r["tag"]: r for r in runs() if r.get("kind") in ("sft", "dpo")}
    inp = CardInputs(
        title=f"bench_quality candidates {', '.join(tags)}", selection=sel, results=results,
        set_parts={**{n: "dev" for n in DEV_SETS}, **{n: "report" for n in REPORT_SETS}},
        set_notes={"arc_challenge_dev": "the selection set: ARC-Challenge has no test split here",
                   "arc_challenge_heldout": "a hashed third of ARC-Challenge train, never trained on"},
        calibration=calib, training_data={t: lineage(t, trained) for t in tags})
    write_model_card(OUT / "model_card.md", inp)
    write_section(a, sel, results, trained, tags, l0, time.perf_counter() - t0)


def lineage(tag: str, trained: dict) -> list[str]:
    """What a model was trained on, back to the base model."""
    out = []
    while tag in trained:
        r = trained[tag]
        if r["kind"] == "sft":
            out.append(f"{tag}: SFT ({r['overrides'][0]}) on {r['train_samples']} questions of pool {r['pool']}"
                       + (f" (hashed subset of {r['limit']})" if r.get("limit") else "")
                       + f", {' '.join(r['overrides'][1:])}")
        else:
            out.append(f"{tag}: DPO on {r['train_pairs']} pairs ({r['pairs']}), {' '.join(r['overrides'])}")
        tag = r["start"]
    return list(reversed(out))


# --- BENCHMARKS.md ---------------------------------------------------------------------------------------------
BENCH_MD = ROOT / "benchmarks" / "BENCHMARKS.md"
GOALS = {"arc_easy_test": 0.70, "arc_challenge_heldout": 0.35, "mmlu_stem_report": 0.30}  # issue 23


def subset_accuracy(tag: str, mode: str, key: str) -> dict[str, float]:
    """Accuracy per dev set (and pooled) of `tag`/`mode` on the questions of dev key `key`; a model evaluated
    on the full dev is cut to the subset's questions, so screening rows compare with the base on the same ones."""
    from stemqa.data.splits import DEV_SETS
    from stemqa.eval.select import read_predictions

    sub = OUT / "evals" / tag / key / mode
    full = OUT / "evals" / tag / "dev" / mode
    ids = {n: None for n in DEV_SETS}
    if key != "dev":
        ids = {n: {p.id for p in read_predictions(next((OUT / "evals").glob(f"*/{key}/*/{n}/predictions.jsonl")))}
               for n in DEV_SETS}
    src = sub if (sub / "calibration.json").exists() else full
    if not (src / "calibration.json").exists():
        return {}
    out, right, n = {}, 0, 0
    for name in DEV_SETS:
        ps = [p for p in read_predictions(src / name / "predictions.jsonl") if ids[name] is None or p.id in ids[name]]
        out[name] = sum(p.pred == p.gold for p in ps) / len(ps)
        right, n = right + sum(p.pred == p.gold for p in ps), n + len(ps)
    out["pooled"] = right / n
    return out


def write_section(a, sel, results, trained: dict, tags: list[str], l0: float, wall: float) -> None:
    from stemqa.data.splits import DEV_SETS, HELD_OUT, REPORT_SETS
    from stemqa.eval.stats import accuracy_of, paired_bootstrap, paired_outcomes

    base_key = (sel.base_best.model, sel.base_best.mode)
    lines = [SECTION, "",
             f"Command: `python benchmarks/bench_quality.py report --candidates {a.candidates}"
             + (f" --report-limit {a.report_limit}" if a.report_limit else "") + f"` ({date.today()}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, shared machine, load average {l0} at start, {load()} at "
             f"end, {wall / 60:.0f} min). It reads the runs made before it by the `sft` / `dpo` / `eval` commands "
             "of the same script (each listed below with its overrides; log: benchmarks/out/quality/runs.jsonl).",
             "",
             "SmolLM2-135M-Instruct, float32 on CPU. Splits (stemqa/data/splits.py, fixed in code, by a hash of the "
             "question): dev = " + ", ".join(f"{n} ({len(results[base_key][n])})" for n in DEV_SETS)
             + "; report = " + ", ".join(f"{n} ({HELD_OUT[n].description})" for n in REPORT_SETS) + ". Training "
             "pools are the training side only (every question of a dev or report set removed, across files). "
             "Accuracies are [Wilson 95% CI]; differences are paired bootstrap 95% CIs on the same questions."
             + (f" Report sets scored here: a hashed {a.report_limit} of each (--report-limit)." if a.report_limit
                else ""), ""]
    # dev table
    lines += ["### Dev: every model and mode (the selection data)", "",
              "| model | mode | " + " | ".join(DEV_SETS) + " | pooled [95% CI] | vs base best | ECE before -> after | "
              "unsure below | answered | acc. when sure |", "|---" * (len(DEV_SETS) + 8) + "|"]
    for s in sel.scores:
        c = calibration_of(s.model, s.mode)
        t = c.threshold
        lines.append(f"| {s.model} | {s.mode} | " + " | ".join(f"{s.per_set[n].value:.3f}" for n in DEV_SETS)
                     + f" | {s.accuracy.fmt()} | {'reference' if s.vs_base is None else s.vs_base.fmt()} | "
                     f"{c.ece_before:.3f} -> {c.ece_after:.3f} | {t.unsure_below:.3f} | {t.coverage:.0%} | "
                     + ("-" if t.accuracy_when_sure is None else f"{t.accuracy_when_sure:.3f}") + " |")
    lines += ["", f"Selection: {sel.reason}.", ""]
    # levers (screening runs)
    lines += ["### Levers: every training run", "",
              "Each run's dev figures next to the base model's on the same dev questions (screening runs use a "
              "hashed subset of each dev set); wall time on the shared machine, with the load average.", "",
              "| run | from | what | dev | mode | " + " | ".join(DEV_SETS) + " | pooled | base same mode | "
              "wall min (load) | train metrics |", "|---" * (len(DEV_SETS) + 9) + "|"]
    for tag, r in trained.items():
        key = next((e["dev"] for e in reversed(runs()) if e.get("kind") == "eval" and e["tag"] == tag), "dev")
        what = (f"SFT {r['overrides'][0].split('=')[1]} on {r['pool']}"
                + (f"[{r['limit']}]" if r.get("limit") else "") + " " + " ".join(r["overrides"][1:])
                if r["kind"] == "sft" else f"DPO on {r['pairs']} pairs " + " ".join(r["overrides"]))
        metrics = (f"eval loss {r['eval_loss_before']:.3f} -> {r['eval_loss']:.3f}" if r["kind"] == "sft" else
                   f"val reward acc {r['val_reward_accuracy_best']}, test {r['test_reward_accuracy']} "
                   f"(n={r['test_pairs']})")
        for mode_dir in sorted((OUT / "evals" / tag / key).glob("*/calibration.json")):
            mode = mode_dir.parent.name
            acc, base = subset_accuracy(tag, mode, key), subset_accuracy("base", mode, key)
            lines.append(f"| {tag} | {r['start']} | {what} | {key} | {mode} | "
                         + " | ".join(f"{acc[n]:.3f}" for n in DEV_SETS) + f" | {acc['pooled']:.3f} | "
                         + (f"{base['pooled']:.3f}" if base else "-")
                         + f" | {r['wall_s'] / 60:.0f} ({r['load'][0]}-{r['load'][1]}) | {metrics} |")
    # report sets
    lines += ["", "### Report sets: never trained on, never used for a choice", "",
              f"The base model in its best dev mode ({base_key[1]}) against each trained model in its best dev mode.",
              "", "| set | n | model | mode | accuracy [95% CI] | vs base best [paired 95% CI] | goal |",
              "|---|---|---|---|---|---|---|"]
    findings = []
    for name in REPORT_SETS:
        ref = results[base_key].get(name)
        for (model, mode), r in results.items():
            if name not in r:
                continue
            acc = accuracy_of([p.pred == p.gold for p in r[name]])
            if (model, mode) == base_key:
                diff_s = "reference"
            else:
                d = paired_bootstrap(*paired_outcomes({p.id: p.pred == p.gold for p in r[name]},
                                                      {p.id: p.pred == p.gold for p in ref}))
                diff_s = d.fmt()
                if (model, mode) == (sel.chosen.model, sel.chosen.mode):
                    goal = GOALS.get(name)
                    findings.append(
                        f"{name}: the selected {model}/{mode} scores {acc.fmt()} against the base's {mode_name(base_key)}"
                        f" {accuracy_of([p.pred == p.gold for p in ref]).value:.3f}; paired difference {d.fmt()}"
                        + (" (above 0)" if d.above_zero else " (not above 0)")
                        + (f"; goal {goal:.2f} " + ("reached" if acc.value >= goal else
                                                    f"not reached ({goal - acc.value:.3f} short)") if goal else ""))
            goal = GOALS.get(name)
            lines.append(f"| {name} | {acc.n} | {model} | {mode} | {acc.fmt()} | {diff_s} | "
                         + (f">= {goal:.2f}: {'yes' if acc.value >= goal else 'no'}" if goal else "-") + " |")
    lines += ["", "### Findings (computed from the figures above)", ""]
    lines += [f"- {f}." for f in findings] or ["- The base model is the selection: no report-set comparison."]
    replace_section("\n".join(lines) + "\n")
    log(f"wrote {BENCH_MD} section {SECTION!r}")


def mode_name(key) -> str:
    return f"{key[0]}/{key[1]}"


def replace_section(body: str, section: str = SECTION) -> None:
    from mdsection import replace_section as replace

    replace(section, body, BENCH_MD)


# --- retrieval as a lever ---------------------------------------------------------------------------------------
RAG_SECTION = "## Quality: retrieval in the scored prompt"
# The whole shared textbook corpus plus QASC's facts (QASC is a training-side set; ARC's `para` fields are not
# used: they belong to particular questions, some of them dev questions).
RAG_CORPUS = ("[{kind: openstax, path: corpus/openstax_university_physics.jsonl}, "
              "{kind: openstax, path: corpus/openstax_chemistry.jsonl}, "
              "{kind: qasc_facts, path: mcq/qasc/dev.jsonl}]")


def rag_index() -> tuple[Path, dict]:
    """The index the retrieval runs use, built once with `stemqa rag build` (Ray Data embedding, FAISS)."""
    d = OUT / "rag_index"
    if not (d / "manifest.json").exists():
        log(f"building the RAG index in {d}")
        _, wall = stemqa(["rag", "build", "--config", "study", "--out", str(d), "--set", "rag.enabled=true",
                          "--set", f"rag.corpus={RAG_CORPUS}"])
        record({"kind": "rag_index", "corpus": RAG_CORPUS, "wall_s": round(wall)})
    return d, json.loads((d / "manifest.json").read_text())


def cmd_rag(a) -> None:
    """Each model's dev questions scored in `--mode` without and with the top-k retrieved passages before the
    question (the evaluator's and the Serve app's own passage cut), in the same run: the paired difference is
    what retrieval adds. No fitting: a temperature changes no prediction."""
    import torch

    from stemqa.data.splits import DEV_SETS
    from stemqa.eval.run import load_scorer, retrieve_passages
    from stemqa.eval.stats import accuracy_of, paired_bootstrap
    from stemqa.rag import Retriever

    torch.set_num_threads(a.threads)
    l0, t0 = load(), time.perf_counter()
    index, manifest = rag_index()
    retriever = Retriever.load(index)
    budget = study_config().rag.token_budget
    sets = held_out("dev", a.dev_limit)
    rows, sentences = [], []
    for tag in a.candidates.split(","):
        scorer = load_scorer(model_path(tag), batch_size=16)
        plain_all, rag_all = [], []
        for name in DEV_SETS:
            qs = sets[name]
            passages = retrieve_passages(retriever, qs, a.k, budget, scorer.tok)
            plain = [p.pred == p.gold for p in scorer.score(qs, a.mode)]
            with_rag = [p.pred == p.gold for p in scorer.score(qs, a.mode, passages=passages)]
            rows.append((tag, name, accuracy_of(plain), accuracy_of(with_rag), paired_bootstrap(with_rag, plain)))
            plain_all += plain
            rag_all += with_rag
            log(f"{tag} {name}: {rows[-1][2].value:.3f} -> {rows[-1][3].value:.3f}")
        before, after, d = accuracy_of(plain_all), accuracy_of(rag_all), paired_bootstrap(rag_all, plain_all)
        rows.append((tag, "pooled", before, after, d))
        record({"tag": tag, "kind": "rag", "mode": a.mode, "k": a.k, "dev": dev_key(a.dev_limit),
                "plain": before.value, "with_rag": after.value, "diff": [d.delta, d.low, d.high]})
        verdict = ("lifts" if d.low > 0 else "lowers" if d.high < 0 else "does not move (beyond noise)")
        sentences.append(f"{tag}/{a.mode}: retrieval {verdict} pooled dev accuracy: {before.fmt()} without "
                         f"passages, {after.fmt()} with them, paired {d.fmt()}.")
    wall = time.perf_counter() - t0
    lines = [RAG_SECTION, "",
             f"Command: `python benchmarks/bench_quality.py rag --candidates {a.candidates} --mode {a.mode} --k {a.k}"
             + (f" --dev-limit {a.dev_limit}" if a.dev_limit else "") + f" --threads {a.threads}` ({date.today()}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, load average {l0} at start, {load()} at end, "
             f"{wall / 60:.0f} min).", "",
             f"The same dev questions scored twice per model in {a.mode}: as they are, and with the top {a.k} "
             f"passages of a FAISS index of {manifest['counts']['chunks']:,} chunks (OpenStax "
             f"University Physics and Chemistry, every paragraph, plus QASC's facts; embedder "
             f"{manifest['embedder']}) put before the question, cut to {budget} model tokens. Accuracies "
             "[Wilson 95% CI]; the difference is with minus without, paired bootstrap 95% CI on the same questions.",
             "", "| model | set | n | without passages | with passages | difference |", "|---|---|---|---|---|---|"]
    lines += [f"| {t} | {n} | {p.n} | {p.fmt()} | {r.fmt()} | {d.fmt()} |" for t, n, p, r, d in rows]
    lines += ["", "Findings (computed from the figures above):", ""] + [f"- {s}" for s in sentences]
    replace_section("\n".join(lines) + "\n", RAG_SECTION)
    log(f"wrote {BENCH_MD} section {RAG_SECTION!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--tag", required=True, help="name of the model / run")
        sp.add_argument("--modes", default=",".join(MODES), help="answer modes to fit and score on dev")
        sp.add_argument("--dev-limit", type=int, default=None, help="screen on a hashed subset of each dev set")
        sp.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
        sp.add_argument("--threads", type=int, default=1, help="torch threads of the evaluation (1: the CPU is "
                        "shared, and a second thread that is descheduled stalls every operation)")
        sp.add_argument("--train-cpus", type=float, default=1.0, help="CPUs (= torch threads) of the Train worker; "
                        "the samples, their order and the steps are the same for any value")

    e = sub.add_parser("eval", help="fit and score a model on dev in every mode")
    common(e)
    s = sub.add_parser("sft", help="`stemqa sft` on a training pool, then eval on dev")
    common(s)
    s.add_argument("--start", default="base", help="model to start from: base or a tag")
    s.add_argument("--pool", default="arc", choices=sorted(POOLS))
    s.add_argument("--limit", type=int, default=None, help="hashed subset of the pool")
    s.add_argument("--data", default="qa", choices=["qa", "mcq"], help="qa: question -> answer text; mcq: letter")
    s.add_argument("--lr", type=float, default=2e-5)
    s.add_argument("--epochs", type=float, default=1.0)
    s.add_argument("--steps", type=int, default=None)
    d = sub.add_parser("dpo", help="`stemqa dpo` on answer pairs from a start model, then eval on dev")
    common(d)
    d.add_argument("--start", required=True)
    d.add_argument("--pairs", default="mcq", help=f"comma list of {sorted(PAIR_SOURCES)}")
    d.add_argument("--pairs-n", type=int, default=None, help="train pairs (val/test: a twentieth, at least 100)")
    d.add_argument("--beta", type=float, default=0.1)
    d.add_argument("--lr", type=float, default=1e-6)
    d.add_argument("--loss", default="sigmoid", choices=["sigmoid", "robust", "ipo"])
    d.add_argument("--steps", type=int, default=None)
    sub.add_parser("table", help="dev figures of every evaluated model and mode")
    r = sub.add_parser("report", help="select on dev, score the report sets, model card, BENCHMARKS.md section")
    r.add_argument("--candidates", required=True, help="comma list of tags (base first) evaluated on the full dev")
    r.add_argument("--report-limit", type=int, default=None, help="a hashed subset of each report set")
    r.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("rag", help="retrieval as a lever: dev in one mode without and with passages, paired")
    g.add_argument("--candidates", default="base", help="comma list of tags")
    g.add_argument("--mode", default="cloze_question")
    g.add_argument("--k", type=int, default=3, help="passages per question")
    g.add_argument("--dev-limit", type=int, default=None, help="a hashed subset of each dev set")
    g.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    {"rag": cmd_rag, "eval": cmd_eval, "sft": cmd_sft, "dpo": cmd_dpo, "table": cmd_table, "report": cmd_report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
