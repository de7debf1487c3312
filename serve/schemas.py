"""Request bodies of the HTTP API and the checks that turn bad input into a 4xx naming the field.

Pydantic checks types and missing fields (FastAPI answers 422 with the field's path); the limits that come
from the config (number of options, text length) are checked here by `check_mcqa`, since FastAPI request
models are fixed when the module is imported while the limits are known only when the app is built.
Every error body has one shape: {"error": message, "field": "choices[2]"}.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A client error: HTTP status, the offending field and what is wrong with it."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def __reduce__(self):  # raised in a replica, it crosses processes by pickle
        return (ApiError, (self.status, self.field, self.message))

    def body(self) -> dict:
        return {"error": f"{self.field}: {self.message}", "field": self.field}


class MCQARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(description="The question text.")
    choices: list[str] = Field(description="The options, in order; answered as letters A, B, ...")
    use_rag: bool = Field(True, description="Put retrieved passages before the question (when an index is served).")
    top_k: Optional[int] = Field(None, ge=1, le=50, description="Passages to retrieve; default: rag.top_k.")
    subject: str = Field("science", max_length=100, description="Subject named in the prompt's header line.")


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions; extra keys that OpenAI clients send (user, n=1, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    seed: Optional[int] = None
    stream: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
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


def validation_error_body(errors: list[dict]) -> tuple[int, dict]:
    """FastAPI's RequestValidationError details -> (status, our error body) naming the first field."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return 400, {"error": f"body: not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", "field": "body"}
    field = ".".join(loc) or "body"
    if first.get("type") == "missing":
        msg = "is required"
    elif first.get("type") == "extra_forbidden":
        msg = "is not a known field"
    else:
        msg = first.get("msg", "is invalid")
    return 422, {"error": f"{field}: {msg}", "field": field, "details": [
        {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body", "message": e.get("msg")}
        for e in errors]}


MAX_PROMPTS = 64  # prompts per /v1/completions request (lm-eval sends its batch_size of them)


def check_prompts(prompt, max_chars: int) -> list:
    """OpenAI's `prompt` (a string, strings, token ids, or lists of token ids) -> a list of prompts."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(422, "prompt", "must not be empty")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(422, "prompt", f"has {len(prompts)} prompts, more than the {MAX_PROMPTS} allowed")
    for i, p in enumerate(prompts):
        field = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            _check_text(field, p, max_chars)
        elif not p:
            raise ApiError(422, field, "must not be empty")
    return prompts


def check_messages(messages: list, max_chars: int) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise ApiError(422, f"messages[{i}].role", f"must be system, user or assistant, got {m.role!r}")
        if len(m.content) > max_chars:
            raise ApiError(422, f"messages[{i}].content", f"is {len(m.content)} characters, more than {max_chars}")
        out.append({"role": m.role, "content": m.content})
    if out[-1]["role"] == "assistant":
        raise ApiError(422, "messages", "the last message must be from the user or system")
    return out
