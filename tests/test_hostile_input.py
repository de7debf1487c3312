"""Property-based tests (hypothesis): random bytes, wrong types and huge values thrown at every bad-input path.

The Serve app's request handling (body size, JSON and types, config limits, token ids, the token budget,
chat messages) and the data loaders (MCQ formats, preference files, QA files, config files and overrides)
must answer each input with a clear error naming the field, or the file and row, and never crash or hang.
Example counts are CI-sized; each test counts the inputs it tried and the module prints (and writes to
tests/artifacts/hostile_input_counts.json, which benchmarks/bench_reliability.py reads) how many.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.schemas import (ApiError, ChatRequest, CompletionRequest, MCQARequest, check_mcqa, check_messages,
                           check_prompts, check_stop, check_token_budget, check_token_ids, parse_body, read_limited)

EXAMPLES = int(os.environ.get("STEMQA_HYPOTHESIS_EXAMPLES", "150"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)
COUNTS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    import shutil

    from conftest import ARTIFACTS

    shutil.rmtree(TMP, ignore_errors=True)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "hostile_input_counts.json").write_text(json.dumps(dict(sorted(COUNTS.items())), indent=2))
    print("\nhostile inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
          + f"; {sum(COUNTS.values())} in all")


# --- values: JSON of any shape, with the real field names and huge or wrong-typed values ---------------------
HUGE_INTS = st.sampled_from([-(2 ** 200), -1, 0, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30])
WEIRD_FLOATS = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 1e-320])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), WEIRD_FLOATS,
                    st.text(max_size=40), st.text(alphabet="\x00\ud7ff\uffff\n\t \"\\", max_size=20))
JSON_VALUES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=6),
                                                          st.dictionaries(st.text(max_size=12), kids, max_size=6)),
                           max_leaves=30)
FIELDS = ["question", "choices", "use_rag", "top_k", "subject", "model", "prompt", "max_tokens", "n", "temperature",
          "top_p", "stop", "logprobs", "echo", "seed", "stream", "messages", "role", "content"]
TOKEN_LISTS = st.lists(st.one_of(st.integers(-5, 60_000), HUGE_INTS, st.booleans()), max_size=50)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON_VALUES, TOKEN_LISTS, st.lists(TOKEN_LISTS, max_size=4),
                                                       st.lists(st.fixed_dictionaries(
                                                           {"role": JSON_VALUES, "content": JSON_VALUES}),
                                                           max_size=4)), max_size=8),
    JSON_VALUES)


def _json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def _clear(err: ApiError, fields: tuple[str, ...] = ()) -> None:
    """A client error: a 4xx, a non-empty message that starts with the field it names."""
    assert 400 <= err.status < 500
    assert err.field and err.message and err.body()["error"].startswith(err.field + ": ")
    if fields:
        assert err.field.split(".")[0].split("[")[0] in fields + ("body",), err.field


MAX_CHARS, MAX_PROMPTS, MAX_MESSAGES, VOCAB, CONTEXT, BUDGET = 4000, 64, 64, 49_152, 2048, 16_384


def _handle(model, raw: bytes):
    """What the ingress does with a body it accepted the size of: parse, then the limits of its route."""
    body = parse_body(model, raw)
    if model is MCQARequest:
        check_mcqa(body, 26, MAX_CHARS)
    elif model is CompletionRequest:
        prompts = check_prompts(body.prompt, MAX_CHARS * 4, MAX_PROMPTS)
        check_stop(body.stop)
        ids = [p if isinstance(p, list) else [1] * len(p) for p in prompts]
        for i, p in enumerate(ids):
            check_token_ids(f"prompt[{i}]", p, VOCAB, CONTEXT)
        check_token_budget("prompt", [len(p) for p in ids], body.max_tokens, body.n, BUDGET)
    else:
        check_messages(body.messages, MAX_CHARS * 4, MAX_MESSAGES)
        check_stop(body.stop)
    return body


ROUTE_FIELDS = {MCQARequest: tuple(MCQARequest.model_fields), CompletionRequest: tuple(CompletionRequest.model_fields),
                ChatRequest: tuple(ChatRequest.model_fields)}


@pytest.mark.parametrize("model", [MCQARequest, CompletionRequest, ChatRequest], ids=lambda m: m.__name__)
@FAST
@given(raw=st.one_of(st.binary(max_size=300), BODIES.map(_json_bytes)))
def test_request_bodies_get_a_clear_4xx_or_pass(model, raw):
    COUNTS[f"{model.__name__} bodies"] += 1
    try:
        _handle(model, raw)
    except ApiError as e:
        _clear(e, ROUTE_FIELDS[model] + ("messages", "prompt"))


@FAST
@given(ids=TOKEN_LISTS, max_tokens=st.one_of(st.integers(0, 300), HUGE_INTS), n_prompts=st.integers(1, 80))
def test_token_id_prompts_and_the_budget(ids, max_tokens, n_prompts):
    COUNTS["token-id prompts"] += 1
    try:
        check_token_ids("prompt", ids, VOCAB, CONTEXT)
    except ApiError as e:
        _clear(e, ("prompt",))
        assert not ids or any(isinstance(t, bool) or not 0 <= t < VOCAB for t in ids) or len(ids) > CONTEXT
    else:
        assert ids and all(0 <= t < VOCAB for t in ids)
    lengths = [len(ids)] * n_prompts
    try:
        total = check_token_budget("prompt", lengths, max_tokens, 1, BUDGET)
        assert total <= BUDGET
    except ApiError as e:
        _clear(e, ("prompt",))
        assert e.status == 413 and "serve.max_request_tokens" in e.message
        assert sum(lengths) + max_tokens * n_prompts > BUDGET


@FAST
@given(messages=st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant"]),
                                                                  st.text(max_size=30)),
                                                "content": st.one_of(st.text(max_size=50),
                                                                     st.just("x" * (MAX_CHARS * 4 + 1)))}),
                         min_size=1, max_size=80))
def test_chat_messages(messages):
    COUNTS["chat messages"] += 1
    raw = _json_bytes({"messages": messages})
    try:
        out = _handle(ChatRequest, raw)
    except ApiError as e:
        _clear(e, ("messages",))
        if len(messages) > MAX_MESSAGES:
            assert "serve.max_messages" in e.message
    else:
        assert len(out.messages) <= MAX_MESSAGES and out.messages[-1].role != "assistant"


class _FakeRequest:
    """A Starlette request's headers and body stream, as read_limited uses them."""

    def __init__(self, chunks: list[bytes], declared):
        self.headers = {} if declared is None else {"content-length": declared}
        self._chunks = chunks

    async def stream(self):
        for c in self._chunks:
            yield c


@FAST
@given(chunks=st.lists(st.binary(max_size=2000), max_size=20), limit=st.integers(1, 20_000),
       declared=st.one_of(st.none(), st.just("true size"), st.sampled_from(["-1", "abc", " 12", "1e9", "9" * 40])))
def test_body_size_limit(chunks, limit, declared):
    COUNTS["body sizes"] += 1
    size = sum(map(len, chunks))
    declared = str(size) if declared == "true size" else declared
    try:
        body = asyncio.run(read_limited(_FakeRequest(chunks, declared), limit))
    except ApiError as e:
        _clear(e, ("body",))
        assert e.status == 413 and size > limit or e.status == 400 or declared not in (None, str(size))
    else:
        assert body == b"".join(chunks) and size <= limit


# --- data loaders: random bytes and rows of wrong shape -----------------------------------------------------
def _location(message: str, path: Path) -> bool:
    """The message names the file and, for a bad row, where in it (`file:line:` or `file:[i]:`)."""
    return str(path) in message


ROWS = st.one_of(JSON_VALUES.map(lambda v: json.dumps(v)),
                 st.dictionaries(st.sampled_from(["question", "choices", "answer", "id", "subject", "options",
                                                  "correct", "rationale", "answerKey", "stem", "label", "text",
                                                  "prompt", "chosen", "rejected", "conversations", "from", "value",
                                                  "source"]), JSON_VALUES, max_size=8).map(json.dumps),
                 st.text(max_size=60))
FILE_BYTES = st.one_of(st.binary(max_size=400),
                       st.lists(ROWS, min_size=1, max_size=6).map(lambda rows: "\n".join(rows).encode()))


TMP = Path(tempfile.mkdtemp(prefix="stemqa-hypothesis-"))  # one folder, each file rewritten; removed at the end


def _write(data: bytes, name: str) -> Path:
    path = TMP / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt,name", [("mmlu_csv", "physics_test.csv"), ("hf_jsonl", "x.jsonl"),
                                      ("arc_jsonl", "arc.jsonl"), ("aqua_jsonl", "aqua.jsonl"),
                                      ("records_jsonl", "records.jsonl")])
@FAST
@given(data=FILE_BYTES)
def test_mcq_loaders(fmt, name, data):
    from stemqa.data.mcq import MCQ, MCQFormatError, load_file

    COUNTS[f"mcq {fmt} files"] += 1
    path = _write(data, name)
    try:
        records, _ = load_file(path, fmt)
    except MCQFormatError as e:
        assert _location(str(e), path) and re.search(r":\d+: ", str(e)), str(e)
    else:
        assert all(isinstance(r, MCQ) and len(r.choices) >= 2 and 0 <= r.answer < len(r.choices) for r in records)
    # skipping instead of failing: every row is either loaded or counted, never dropped silently
    try:
        records, report = load_file(path, fmt, skip_invalid=True)
    except MCQFormatError as e:  # a file that cannot be read at all (not UTF-8) still fails, naming it
        assert _location(str(e), path)
    else:
        assert report.loaded == len(records)


@pytest.mark.parametrize("kind,name", [("pairs", "p.jsonl"), ("sharegpt", "s.json"), ("hh", "hh.jsonl"),
                                       ("aqua", "aqua.jsonl")])
@FAST
@given(data=st.one_of(FILE_BYTES, st.lists(JSON_VALUES, max_size=5).map(_json_bytes)))
def test_preference_loaders(kind, name, data):
    from stemqa.data.preference import Pair, PreferenceFormatError, load_pairs

    COUNTS[f"preference {kind} files"] += 1
    path = _write(data, name)
    try:
        pairs, report = load_pairs(kind, path)
    except PreferenceFormatError as e:
        assert _location(str(e), path), str(e)
    else:
        assert all(isinstance(p, Pair) for p in pairs) and report["loaded"] == len(pairs)


@pytest.mark.parametrize("fmt", ["qa_jsonl", "aqua_jsonl"])
@FAST
@given(data=FILE_BYTES)
def test_qa_loaders(fmt, data):
    from stemqa.data.qa import QA, QAFormatError, load_qa_file

    COUNTS[f"qa {fmt} files"] += 1
    path = _write(data, "qa.jsonl")
    try:
        records = load_qa_file(path, fmt)
    except QAFormatError as e:
        assert _location(str(e), path) and re.search(r":\d+: ", str(e)), str(e)
    else:
        assert all(isinstance(r, QA) and r.question.strip() and r.answer.strip() for r in records)


CONFIG_KEYS = ["name", "model", "serve", "sft", "dpo", "rag", "eval", "data", "base", "cluster", "port", "lr",
               "max_request_tokens", "top_k", "enabled", "x"]
YAML_DOCS = st.one_of(
    st.binary(max_size=300),
    st.recursive(SCALARS.filter(lambda v: not (isinstance(v, float) and v != v)),
                 lambda kids: st.one_of(st.lists(kids, max_size=4),
                                        st.dictionaries(st.sampled_from(CONFIG_KEYS), kids, max_size=4)),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()))


@FAST
@given(doc=YAML_DOCS, overrides=st.lists(st.one_of(
    st.text(max_size=40),
    st.tuples(st.sampled_from(["serve.port", "serve.max_request_tokens", "sft.lr", "rag.top_k", "dpo.beta",
                               "serve", "model.name.x", "eval.sets"]),
              st.one_of(st.text(max_size=20), st.sampled_from(["[", "{a: [", "-1", "1e999", "null", "!!python/object:os.system"]))
              ).map(lambda kv: f"{kv[0]}={kv[1]}")), max_size=3))
def test_config_files_and_overrides(doc, overrides):
    from stemqa.config import StemqaConfig, load_config
    from stemqa.config.load import ConfigError

    COUNTS["config files and overrides"] += 1
    path = _write(doc, "config.yaml")
    try:
        cfg = load_config(str(path), overrides)
    except ConfigError as e:
        assert str(path) in str(e) or any(o[:20] in str(e) for o in overrides) or "override" in str(e), str(e)
    else:
        assert isinstance(cfg, StemqaConfig)
