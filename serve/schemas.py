"""Request bodies of the HTTP API and the checks that turn bad input into a 4xx naming the field.

A request is taken apart in this order, each step answering a 4xx of its own: the API key (401, before the
body is read: an unauthenticated client learns nothing about the schema), the body's size
(`read_limited`: 413 naming serve.max_request_bytes), JSON and types (`parse_body`: pydantic, 400/422 naming
the field), then the limits that come from the config (`check_mcqa`, `check_prompts`, `check_messages`;
the token budget `check_token_budget` and token ids `check_token_ids` in the scorer, which has the tokenizer).
Every error body has one shape: {"error": message, "field": "choices[2]"}.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from stemqa.eval.modes import CLOZE_LABELS, MODES, ModeParams, as_params


class ApiError(Exception):
    """A client error: HTTP status, the offending field and what is wrong with it."""

    def __init__(self, status: int, field: str, message: str, details: Optional[list] = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.details = status, field, message, details

    def __reduce__(self):  # raised in a replica, it crosses processes by pickle
        return (ApiError, (self.status, self.field, self.message, self.details))

    def body(self) -> dict:
        out = {"error": f"{self.field}: {self.message}", "field": self.field}
        if self.details:
            out["details"] = self.details
        return out


# torch.Generator.manual_seed takes this range; outside it a seed would fail in the replica
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1
MAX_STOPS = 16  # stop strings per request (OpenAI allows 4)


# /v1/mcqa's `scoring`: the four modes and the cloze variants' labels (ModeParams.label())
SCORING = MODES + tuple(CLOZE_LABELS)


class MCQARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="The question text.")
    choices: list[str] = Field(description="The options, in order; answered as letters A, B, ...")
    use_rag: bool = Field(True, description="Put retrieved passages before the question (when an index is served).")
    top_k: Optional[int] = Field(None, ge=1, le=50, description="Passages to retrieve; default: rag.top_k.")
    subject: str = Field("science", max_length=100, description="Subject named in the prompt's header line.")
    scoring: Optional[Literal[SCORING]] = Field(
        None, description="Answer mode (stemqa/eval/modes.py). Default: the served mode (serve.mode_params, fitted on "
        "dev: calibrated, with an 'unsure' threshold), else letter. The served mode's name (or its label, e.g. "
        "cloze_question) gets its fitted parameters; another mode is answered uncalibrated (temperature 1, "
        "`unsure` null). letter_debiased needs the served letter prior (422 naming `scoring` without it). "
        "permute reads one prompt per option, cloze the question then each option: both count against "
        "serve.max_request_tokens.")


class PassageOut(BaseModel):
    text: str
    source: Optional[str] = None
    score: Optional[float] = Field(None, description="Similarity of the passage to the question.")


class Calibration(BaseModel):
    """The served mode's fitted parameters (serve.mode_params) that shaped this answer."""

    temperature: float = Field(description="probabilities = softmax(scores / temperature), fitted on dev.")
    unsure_below: Optional[float] = Field(description="A top probability below this is answered 'unsure'.")
    accuracy_when_unsure: Optional[float] = Field(description="Dev accuracy of the questions under the threshold.")
    accuracy_when_sure: Optional[float] = Field(description="Dev accuracy of the questions at or over it.")
    model: str = Field(description="The model the parameters were fitted for.")
    fitted_on: str = Field(description="The dev data they were fitted on.")


class Usage(BaseModel):
    tokens: int = Field(description="Input tokens the answer mode's forward passes read (letter: the prompt; "
                        "permute: the prompt once per permutation; cloze: the question, then each option), counted "
                        "against serve.max_request_tokens.")


class MCQAResponse(BaseModel):
    """What /v1/mcqa answers (documentation: the route builds it as a dict)."""

    answer: str = Field(description="Letter of the option with the highest probability. When `unsure` is true the "
                        "assistant does not give it as the answer: show every option with its probability instead.")
    unsure: Optional[bool] = Field(description="The calibrated top probability (`confidence`) is under the served "
                                   "mode's 'unsure' threshold; null when the mode answered in has no threshold.")
    confidence: float = Field(description="The top probability, i.e. probabilities[answer].")
    dev_accuracy: Optional[float] = Field(
        description="How often the model, in this mode, was right on the dev questions on this side of the threshold "
        "(under it when unsure, at or over it otherwise); null without a fitted threshold.")
    mode: str = Field(description="The answer mode used: letter, cloze (cloze_question, cloze_acc, ...), "
                      "letter_debiased, permute (permuteK when it uses K permutations).")
    probabilities: dict[str, float] = Field(description="Per option letter, softmax(scores / temperature).")
    calibration: Optional[Calibration] = Field(
        description="The fitted parameters of the served mode; null when the request's `scoring` chose another.")
    passages: list[PassageOut] = Field(description="Retrieved passages put before the question, best first.")
    model: str = Field(description="The served model's id.")
    usage: Usage = Field(description="What answering cost.")
    latency_ms: float = Field(description="Time in the app, from the request's arrival to the answer.")


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions; extra keys that OpenAI clients send (user, n=1, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=0)
    n: int = Field(1, ge=1, le=1, description="Completions per prompt; this server makes one.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="Replies per request; this server makes one.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False


def _check_text(field: str, text: str, max_chars: int) -> None:
    if not text.strip():
        raise ApiError(422, field, "must not be empty")
    if len(text) > max_chars:
        raise ApiError(422, field, f"is {len(text)} characters, more than the {max_chars} allowed")


def check_mcqa(req: MCQARequest, max_choices: int, max_chars: int) -> None:
    """Limits from the config; raises ApiError naming the first bad field."""
    _check_text("question", req.question, max_chars)
    if len(req.choices) < 2:
        raise ApiError(422, "choices", f"needs at least 2 options, got {len(req.choices)}")
    if len(req.choices) > max_choices:
        raise ApiError(422, "choices", f"has {len(req.choices)} options, more than the {max_choices} allowed")
    for i, choice in enumerate(req.choices):
        _check_text(f"choices[{i}]", choice, max_chars)


def scoring_params(scoring: Optional[str], served: ModeParams) -> ModeParams:
    """The parameters a /v1/mcqa request is answered with: the served ones (serve.mode_params) when it names none or
    their mode, else the bare mode it names (temperature 1, no 'unsure' threshold)."""
    if scoring is None or scoring in (served.mode, served.label()):
        return served
    if scoring == "letter_debiased":
        raise ApiError(422, "scoring", f"'letter_debiased' needs a letter prior fitted on dev (serve.mode_params of "
                       f"mode letter_debiased); this server answers in {served.label()!r} and has none")
    return as_params(scoring)


MAX_DETAILS = 10  # validation errors listed in one answer (a list of 64 bad prompts makes hundreds)


def validation_error(errors: list[dict]) -> ApiError:
    """Pydantic's validation errors -> an ApiError naming the first field (400 for JSON that does not parse)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "body", f"not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    field = ".".join(loc) or "body"
    if first.get("type") == "missing":
        msg = "is required"
    elif first.get("type") == "extra_forbidden":
        msg = "is not a known field"
    else:
        msg = first.get("msg", "is invalid")
    return ApiError(422, field, msg, [
        {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body", "message": e.get("msg")}
        for e in errors[:MAX_DETAILS]])


def check_stop(stop) -> None:
    if isinstance(stop, list) and len(stop) > MAX_STOPS:
        raise ApiError(422, "stop", f"has {len(stop)} strings, more than the {MAX_STOPS} allowed")


def check_prompts(prompt, max_chars: int, max_prompts: int) -> list:
    """OpenAI's `prompt` (a string, strings, token ids, or lists of token ids) -> a list of prompts."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(422, "prompt", "must not be empty")
    if len(prompts) > max_prompts:
        raise ApiError(422, "prompt", f"has {len(prompts)} prompts, more than this server's serve.max_prompts "
                       f"of {max_prompts}")
    for i, p in enumerate(prompts):
        field = prompt_field(i, len(prompts))
        if isinstance(p, str):
            _check_text(field, p, max_chars)
        elif not p:
            raise ApiError(422, field, "must not be empty")
    return prompts


def prompt_field(i: int, n: int) -> str:
    return "prompt" if n == 1 else f"prompt[{i}]"


def check_token_ids(field: str, ids: list, vocab: int, max_length: int) -> None:
    """Token ids a model can read: integers in [0, vocab), no more than its context."""
    if not ids:
        raise ApiError(422, field, "must not be empty")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in ids):
        raise ApiError(422, field, f"token ids must be integers in [0, {vocab})")
    if len(ids) > max_length:
        raise ApiError(413, field, f"is {len(ids)} tokens, over the model's context of {max_length}")


def check_token_budget(field: str, prompt_lengths: list[int], max_tokens: int, n: int, limit: int) -> int:
    """The tokens one request may make the model read and write: every prompt's tokens plus max_tokens x n for
    each prompt. Over `limit` (serve.max_request_tokens): 413 naming it. Returns the total."""
    total = sum(prompt_lengths) + max_tokens * n * len(prompt_lengths)
    if total > limit:
        raise ApiError(413, field, f"this request needs {total} tokens ({sum(prompt_lengths)} prompt tokens in "
                       f"{len(prompt_lengths)} prompt(s) + max_tokens {max_tokens} x n {n} each), over this "
                       f"server's serve.max_request_tokens of {limit}")
    return total


def check_messages(messages: list, max_chars: int, max_messages: int) -> list[dict]:
    if len(messages) > max_messages:
        raise ApiError(422, "messages", f"has {len(messages)} messages, more than this server's "
                       f"serve.max_messages of {max_messages}")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise ApiError(422, f"messages[{i}].role", f"must be system, user or assistant, got {m.role[:40]!r}")
        if len(m.content) > max_chars:
            raise ApiError(422, f"messages[{i}].content", f"is {len(m.content)} characters, more than {max_chars}")
        out.append({"role": m.role, "content": m.content})
    if out[-1]["role"] == "assistant":
        raise ApiError(422, "messages", "the last message must be from the user or system")
    return out


async def read_limited(request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (serve.max_request_bytes): by its
    Content-Length before reading, and while reading when it has none or lies."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "body", f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > limit:
            raise ApiError(413, "body", f"is {int(declared)} bytes, over this server's serve.max_request_bytes "
                           f"of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body", f"is over this server's serve.max_request_bytes of {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    """A request model from the raw body; bad JSON is 400, a wrong or missing field 422 naming it."""
    from pydantic import ValidationError

    if not raw.strip():
        raise ApiError(400, "body", "is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise validation_error(list(e.errors(include_url=False, include_input=False))) from None
