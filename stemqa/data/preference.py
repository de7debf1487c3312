"""Preference pairs {id, prompt, chosen, rejected, source} for DPO: loaders, STEM filter, length cap, split.

Sources (strings as in `DataConfig.preference`, paths relative to the data root):
- `pairs:<file>`    JSONL `{prompt, chosen, rejected}` (optional `id`).
- `sharegpt:<file>` JSON array `{conversations:[{from,value}], chosen:{from,value}, rejected:{from,value}}`.
- `hh:<file>`       (gzip) JSONL `{chosen, rejected}`, whole `\\n\\nHuman: ...\\n\\nAssistant: ...` dialogues; the
                    prompt is their common prefix up to the last `Assistant:` turn.
- `aqua:<file>`     STEM pairs derived from AQuA-RAT: prompt = question + options; chosen = the worked rationale
                    ending in the right option; rejected = a reasoning-free wrong option ("The answer is C) 600").
                    Easy: the two differ from the first token on (a rationale vs none), so a model can tell them
                    apart without any STEM knowledge.
- `aqua_hard:<file>` the same prompt and chosen; rejected = the *same* rationale ending in a wrong option, so the
                    pair differs only in which option the reasoning reaches.
- `mcq:<format>:<path>` answer pairs from an MCQ set (`format` as `McqSource.format`; a file or a directory):
                    prompt = `Question: <q>\nAnswer:` (the cloze context of lm-eval's ARC task and `sft.data: qa`),
                    chosen = ` <right option's text>`, rejected = ` <a wrong option's text>` (one per question,
                    seeded): the same format on both sides, so only knowing the answer separates them. Only the
                    training part of the fixed splits is read (`McqSource.split: train`, stemqa.data.splits), a
                    question met in an earlier `mcq:` source is skipped (counted), and the STEM keyword filter
                    does not apply (the MCQ sets are chosen by the config, and short answers rarely name a field).

A malformed row raises `PreferenceFormatError` naming the file and line (or array index); with
`skip_invalid` it is skipped and counted instead. `prepare_pairs` filters, caps lengths, splits
deterministically and writes `train/val/test.jsonl` plus `prep.json` (every count) to a directory.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from stemqa.data.mcq import LETTERS, MCQ
from stemqa.data.qa import qa_from_mcq, qa_prompt

SPLITS = ("train", "val", "test")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

# Words that mark a science/maths/engineering text; a pair is kept when its prompt or chosen answer has one.
STEM_KEYWORDS = (
    "math", "algebra", "geometry", "calculus", "equation", "integral", "derivative", "probability", "statistic",
    "percent", "ratio", "average", "sum of", "product", "number", "digit", "divisible", "prime", "fraction",
    "triangle", "circle", "radius", "area", "volume", "perimeter", "angle", "speed", "velocity", "acceleration",
    "force", "energy", "mass", "momentum", "physics", "electr", "magnet", "circuit", "voltage", "wavelength",
    "chemi", "molecule", "atom", "reaction", "acid", "compound", "biolog", "cell", "protein", "gene", "dna",
    "enzyme", "organism", "evolution", "ecosystem", "photosynthesis", "planet", "orbit", "gravity", "temperature",
    "algorithm", "program", "python", "function", "variable", "matrix", "vector", "code", "comput", "data",
    "calculate", "formula", "theorem", "proof", "km", "meter", "litre", "liter", "kg", "interest rate",
)
# ... or arithmetic written out (word problems such as AQuA's rarely name their field: "20 * 3 = 60").
_STEM_RE = re.compile("|".join([re.escape(k) for k in STEM_KEYWORDS] + [r"\d\s*[-+*/=×÷^]\s*\(?\d"]),
                      re.IGNORECASE)


class PreferenceFormatError(ValueError):
    """A row that is not a valid preference pair; the message starts with `file:line:`."""


@dataclass
class Pair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    source: str

    def __post_init__(self):
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"field '{name}' must be a non-empty string")
        if self.chosen == self.rejected:
            raise ValueError("chosen and rejected are identical")


def is_stem(pair: Pair) -> bool:
    return bool(_STEM_RE.search(pair.prompt) or _STEM_RE.search(pair.chosen))


# ---------------------------------------------------------------- readers: (location, raw row) per row
def _jsonl(path: Path) -> Iterator[tuple[str, object]]:
    # bytes decoded line by line: a line that is not UTF-8 is that row's error, not a crash of the whole file
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # a .gz file that is not gzip, or cut short
                raise PreferenceFormatError(f"{path}:{lineno + 1}: cannot be read: {e}") from None
            if not raw:
                return
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{lineno}", ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    yield f"{path}:{lineno}", ValueError(f"not valid JSON: {e}")


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise PreferenceFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise PreferenceFormatError(f"{path}: expected a JSON array of pairs, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}:[{i}]", row


def _field(row, key: str):
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"missing field '{key}'")
    return row[key]


# ---------------------------------------------------------------- row -> Pair for each layout
def _from_pairs(row, loc: str, source: str) -> Pair:
    return Pair(str(row.get("id", loc)) if isinstance(row, dict) else loc, _field(row, "prompt"),
                _field(row, "chosen"), _field(row, "rejected"), source)


def _turn_text(turn, where: str) -> tuple[str, str]:
    role, value = _field(turn, "from"), _field(turn, "value")
    if not isinstance(value, str):
        raise ValueError(f"{where}.value must be a string")
    return role, value


def _from_sharegpt(row, loc: str, source: str) -> Pair:
    convo = _field(row, "conversations")
    if not isinstance(convo, list) or not convo:
        raise ValueError("field 'conversations' must be a non-empty list")
    prompt = ""
    for i, turn in enumerate(convo):
        role, value = _turn_text(turn, f"conversations[{i}]")
        prompt += (HUMAN if role in ("human", "user") else ASSISTANT) + " " + value.strip()
    chosen = _turn_text(_field(row, "chosen"), "chosen")[1]
    rejected = _turn_text(_field(row, "rejected"), "rejected")[1]
    return Pair(loc, prompt + ASSISTANT, " " + chosen.strip(), " " + rejected.strip(), source)


def _from_hh(row, loc: str, source: str) -> Pair:
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("fields 'chosen' and 'rejected' must be strings")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("chosen and rejected share no dialogue prefix ending in an 'Assistant:' turn")
    cut += len(ASSISTANT)
    return Pair(loc, chosen[:cut], chosen[cut:], rejected[cut:], source)


def _from_aqua(row, loc: str, source: str, index: int, seed: int) -> Pair:
    question, options = _field(row, "question"), _field(row, "options")
    rationale, correct = _field(row, "rationale"), _field(row, "correct")
    if not isinstance(options, list) or len(options) < 2:
        raise ValueError("field 'options' must be a list of at least 2 options")
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.startswith(f"{LETTERS[i]})"):
            raise ValueError(f"option {i} {opt!r} is not '{LETTERS[i]})...'")
    if not isinstance(correct, str) or correct.strip() not in LETTERS[:len(options)]:
        raise ValueError(f"correct {correct!r} is not one of the option letters")
    if not isinstance(rationale, str) or not rationale.strip():
        raise ValueError("field 'rationale' is empty")
    right = LETTERS.index(correct.strip())
    wrong = [i for i in range(len(options)) if i != right]
    pick = wrong[np.random.default_rng([seed, index]).integers(len(wrong))]  # deterministic per row
    prompt = f"Question: {question.strip()}\nOptions: {' '.join(o.strip() for o in options)}\nAnswer:"
    chosen = f" {rationale.strip()}\nThe answer is {options[right].strip()}"
    rejected = f" The answer is {options[pick].strip()}"
    return Pair(f"{source}/{index + 1}", prompt, chosen, rejected, source)


def _from_aqua_hard(row, loc: str, source: str, index: int, seed: int) -> Pair:
    easy = _from_aqua(row, loc, source, index, seed)
    rationale = row["rationale"].strip()
    return Pair(easy.id, easy.prompt, easy.chosen, f" {rationale}\n{easy.rejected.strip()}", source)


def mcq_pair(q: MCQ, source: str, seed: int = 0) -> Pair:
    """Question -> right option's text vs one wrong option's text (chosen per question from `seed` and its id)."""
    wrong = [i for i in range(len(q.choices)) if i != q.answer and q.choices[i].strip() != q.choices[q.answer].strip()]
    if not wrong:
        raise ValueError(f"{q.id}: no wrong option differs from the right one")
    key = int.from_bytes(hashlib.sha256(f"{seed}/{q.id}".encode()).digest()[:8], "big")
    pick = wrong[key % len(wrong)]
    return Pair(f"{source}/{q.id}", qa_prompt(qa_from_mcq(q)), f" {q.choices[q.answer].strip()}",
                f" {q.choices[pick].strip()}", source)


def load_mcq_pairs(spec_rest: str, data_root: Path, source: str, skip_invalid: bool = False, seed: int = 0,
                   seen: Optional[set] = None) -> tuple[list[Pair], dict]:
    """`mcq:<format>:<path>` -> answer pairs of its training-side questions; `seen` (`splits.key`s) is shared
    across sources so a question in two files gives one pair."""
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_source
    from stemqa.data.splits import key

    from stemqa.data.mcq import PARSERS

    fmt, sep, rel = spec_rest.partition(":")
    if not sep or not rel:
        raise ValueError(f"preference source {source!r}: expected 'mcq:<format>:<path>'")
    if fmt not in PARSERS:
        raise ValueError(f"preference source {source!r}: format {fmt!r} is not one of {', '.join(PARSERS)}")
    records, reports = load_source(McqSource(path=rel, format=fmt, split="train"), data_root, skip_invalid)
    seen = set() if seen is None else seen
    pairs, report = [], {"path": rel, "loaded": 0, "skipped": sum(r.skipped for r in reports),
                         "reasons": [x for r in reports for x in r.reasons][:5],
                         "held_out": sum(r.other_split for r in reports), "duplicate_questions": 0}
    for q in records:
        k = key(q)
        if k in seen:
            report["duplicate_questions"] += 1
            continue
        seen.add(k)
        try:
            pairs.append(mcq_pair(q, source, seed))
        except ValueError as e:
            if not skip_invalid:
                raise PreferenceFormatError(f"{rel}: {e}") from None
            report["skipped"] += 1
    report["loaded"] = len(pairs)
    return pairs, report


def load_pairs(kind: str, path, source: Optional[str] = None, skip_invalid: bool = False,
               seed: int = 0) -> tuple[list[Pair], dict]:
    """Read one preference file; returns the pairs and a report {path, loaded, skipped, reasons}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference file")
    source = source or f"{kind}:{path.name}"
    rows: Iterator[tuple[str, object]]
    makers: dict[str, Callable] = {"pairs": _from_pairs, "sharegpt": _from_sharegpt, "hh": _from_hh}
    if kind == "sharegpt":
        rows = _json_array(path)
    elif kind in ("pairs", "hh", "aqua", "aqua_hard"):
        rows = _jsonl(path)
    else:
        raise ValueError(f"unknown preference source kind {kind!r} (known: {', '.join(KINDS)})")
    pairs, report = [], {"path": str(path), "loaded": 0, "skipped": 0, "reasons": []}
    for index, (loc, row) in enumerate(rows):
        try:
            if isinstance(row, Exception):
                raise row
            if kind in ("aqua", "aqua_hard"):
                pair = (_from_aqua if kind == "aqua" else _from_aqua_hard)(row, loc, source, index, seed)
            else:
                pair = makers[kind](row, loc, source)
        except (ValueError, TypeError, KeyError) as e:
            if not skip_invalid:
                raise PreferenceFormatError(f"{loc}: {e}") from None
            report["skipped"] += 1
            if len(report["reasons"]) < 5:
                report["reasons"].append(f"{loc}: {e}")
            continue
        pairs.append(pair)
    report["loaded"] = len(pairs)
    return pairs, report


def aqua_pairs(path, seed: int = 0, skip_invalid: bool = False) -> list[Pair]:
    """STEM preference pairs from an AQuA-RAT JSONL file (see the module docstring)."""
    return load_pairs("aqua", path, source="aqua", skip_invalid=skip_invalid, seed=seed)[0]


KINDS = ("pairs", "sharegpt", "hh", "aqua", "aqua_hard", "mcq")


def parse_source(spec: str) -> tuple[str, str]:
    kind, sep, path = spec.partition(":")
    if not sep or not path or kind not in KINDS:
        raise ValueError(f"preference source {spec!r}: expected '<kind>:<path>' (kinds: {', '.join(KINDS)}; "
                         "mcq:<format>:<path>)")
    return kind, path


# ---------------------------------------------------------------- filter, cap, split, write
def pair_length(tokenizer, pair: Pair) -> int:
    """Tokens of prompt + the longer completion + eos (what a DPO forward sees)."""
    n_prompt = len(tokenizer(pair.prompt, add_special_tokens=True)["input_ids"])
    n_comp = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in (pair.chosen, pair.rejected))
    return n_prompt + n_comp + 1


def split_sizes(n: int, fractions, sizes=None) -> tuple[tuple[int, int, int], str]:
    """Absolute sizes when given and they fit in n, else fractions of n (the rest goes to train)."""
    if sizes is not None and sum(sizes) <= n:
        return tuple(int(s) for s in sizes), "sizes"
    total = sum(fractions)
    if total <= 0:
        raise ValueError(f"dpo.split {fractions}: the shares must sum to more than 0")
    val, test = (int(round(n * f / total)) for f in fractions[1:])
    return (n - val - test, val, test), "fractions"


def write_pairs(pairs: list[Pair], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


def read_pairs(path) -> list[Pair]:
    """Pairs written by `prepare_pairs` (any {prompt, chosen, rejected} JSONL; id and source optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pairs file")
    pairs = []
    for loc, row in _jsonl(path):
        try:
            if isinstance(row, Exception):
                raise row
            pair = _from_pairs(row, loc, str(row.get("source", path.stem)))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise PreferenceFormatError(f"{loc}: {e}") from None
        pairs.append(pair)
    return pairs


def prepare_pairs(sources: list[str], data_root: Path, tokenizer, cfg, out_dir: Path) -> dict:
    """Load every source, keep STEM pairs (if cfg.stem_filter), drop pairs over cfg.max_len tokens, split
    deterministically (cfg.seed) and write out_dir/{train,val,test}.jsonl + prep.json.

    Returns {"dir", "train", "val", "test" (paths), "counts": {...}}.
    """
    if not sources:
        raise ValueError("no preference sources (data.preference is empty)")
    out_dir = Path(out_dir)
    pairs, counts = [], {"sources": {}}
    seen_questions: set = set()  # mcq sources: one pair per question across files
    for spec in sources:
        kind, rel = parse_source(spec)
        if kind == "mcq":
            loaded, report = load_mcq_pairs(rel, Path(data_root), spec, cfg.skip_invalid, cfg.seed, seen_questions)
        else:
            path = Path(rel) if Path(rel).is_absolute() else Path(data_root) / rel
            loaded, report = load_pairs(kind, path, source=spec, skip_invalid=cfg.skip_invalid, seed=cfg.seed)
        stem = [p for p in loaded if is_stem(p)] if cfg.stem_filter and kind != "mcq" else loaded
        counts["sources"][spec] = {"loaded": len(loaded), "skipped_invalid": report["skipped"],
                                   "invalid_reasons": report["reasons"], "stem_kept": len(stem),
                                   "stem_dropped": len(loaded) - len(stem)}
        for extra in ("held_out", "duplicate_questions"):
            if extra in report:
                counts["sources"][spec][extra] = report[extra]
        pairs += stem
    seen, unique = set(), []
    for p in pairs:  # ids must be unique: reference log-probs are joined to pairs by id
        if p.id in seen:
            raise ValueError(f"duplicate pair id {p.id!r} across preference sources")
        seen.add(p.id)
        unique.append(p)
    kept = [p for p in unique if pair_length(tokenizer, p) <= cfg.max_len]
    counts.update(total=len(unique), too_long_dropped=len(unique) - len(kept), kept=len(kept))
    if not kept:
        raise ValueError(f"no preference pairs left after filtering ({json.dumps(counts)})")
    (n_train, n_val, n_test), how = split_sizes(len(kept), cfg.shares, cfg.split_sizes)
    order = np.random.default_rng(cfg.seed).permutation(len(kept))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val),
              "test": (n_train + n_val, n_train + n_val + n_test)}
    result = {"dir": str(out_dir)}
    for name, (a, b) in bounds.items():
        write_pairs([kept[i] for i in order[a:b]], out_dir / f"{name}.jsonl")
        result[name] = str(out_dir / f"{name}.jsonl")
        counts[name] = b - a
    counts["split_by"] = how
    (out_dir / "prep.json").write_text(json.dumps(counts, indent=2))
    result["counts"] = counts
    return result
