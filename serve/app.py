"""The stemqa Serve app: a FastAPI ingress in front of the scorer (the LM) and the retriever (FAISS index).

    POST /v1/mcqa   {question, choices[], use_rag=true, top_k, subject, scoring}
                    -> {answer, unsure, confidence, dev_accuracy, mode, probabilities {A: p, ...}, calibration,
                        passages [{text, source, score}], model, usage {tokens}, latency_ms}
                    answered in the served answer mode (serve.mode_params: fitted on dev, calibrated, with an
                    "unsure" threshold) or the mode `scoring` names (serve/schemas.py MCQAResponse)
    POST /v1/completions       OpenAI-compatible (prompt as text or token ids, max_tokens, temperature, top_p,
                               stop, logprobs, echo): enough for lm-eval-harness's `local-completions` model
    POST /v1/chat/completions  OpenAI-compatible, `stream: true` sends server-sent events
    GET  /v1/models            OpenAI-style model list
    GET  /healthz              200 when the scorer answers, 503 otherwise (no API key needed)
    GET  /openapi.json         the OpenAPI schema (with the API key when one is set)
    GET  /                     the web page for students (static/index.html, no CDN)

`build_app(cfg, model_dir, index_dir, mode_params)` returns the Serve application; `app_builder(args)` is the
same for `serve run serve/config.yaml` / `serve deploy`. The API key is read from the environment variable named by
`serve.api_key_env` when the app is built; only its SHA-256 travels to the replicas. Errors are JSON
{"error", "field"} with a 4xx naming the field (serve/schemas.py).

No `from __future__ import annotations` here: FastAPI reads the route parameters' annotations at runtime,
and inside a Serve ingress class string annotations were not resolved (every body became a query param).
"""

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.deployments import Retriever, Scorer, quiet_logging, retriever_options, scorer_options, threads_for
from serve.schemas import (ApiError, ChatRequest, CompletionRequest, MCQARequest, MCQAResponse, check_mcqa,
                           check_messages, check_prompts, check_stop, parse_body, read_limited, scoring_params,
                           validation_error)
from stemqa.config import StemqaConfig
from stemqa.data.mcq import LETTERS
from stemqa.eval.modes import ModeParams

STATIC = Path(__file__).resolve().parent / "static"

# A replica that died (killed, its node lost) or that Serve cannot reach: the call did not happen, or its
# result is lost; every call the ingress makes is idempotent, so it is sent again and Serve routes it to a live
# replica (or waits for the replacement it is starting).
REPLICA_GONE = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)

# openapi_url=None: the schema is served by a route of the ingress, behind the API key like every other route
api = FastAPI(title="stemqa", description="STEM multiple-choice study assistant", docs_url=None, redoc_url=None,
              openapi_url=None)

# The routes read the raw body (auth before parsing, serve/schemas.py), so FastAPI cannot see their models: the
# schema names them here.
MCQA_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": MCQARequest.model_json_schema()}}}}


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    err = validation_error(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _as_api_error(exc: BaseException) -> Optional[ApiError]:
    """An ApiError raised in a replica reaches the ingress wrapped in a RayTaskError; unwrap it."""
    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, ApiError):
            return ApiError(e.status, e.field, e.message, e.details)
    return None


async def sse_chunks(head: dict, pieces) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events: role first, then content deltas, then finish_reason, then [DONE]."""
    def event(delta: dict, finish: Optional[str] = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        async for piece in pieces:
            yield event({"content": piece})
    except Exception as e:  # the status line is already sent: report the failure in the stream itself
        yield f"data: {json.dumps({'error': {'message': f'generation failed: {type(e).__name__}'}})}\n\n"
        return
    yield event({}, "stop")
    yield "data: [DONE]\n\n"


# Everything the ingress uses is defined above it: @serve.deployment serializes the class when it is
# decorated, so a helper defined further down would be missing in the replica.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, retriever: Optional[DeploymentHandle], settings: dict):
        self.scorer, self.retriever, self.settings = scorer, retriever, settings
        # the served answer mode; `fitted`: it came from serve.mode_params (else bare letter scoring)
        self.mode_params = ModeParams.model_validate(settings.get("mode_params") or {})
        self.fitted = bool(settings.get("mode_params"))
        self.retries = 0  # calls sent again after a replica failure (stats)

    # --- helpers ------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        expected = self.settings.get("api_key_sha256")
        if not expected:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not key or not hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), expected):
            raise ApiError(401, "authorization", "a valid API key is required (Authorization: Bearer <key>)")

    async def _body(self, request: Request, model):
        """Key first (nothing about the body reaches a client without one), then size, then JSON and types.
        The routes take the raw Request: FastAPI would parse and validate a typed body before the route runs."""
        self._authorize(request)
        raw = await read_limited(request, self.settings["max_request_bytes"])
        return parse_body(model, raw)

    async def _call(self, send: Callable[[], Awaitable]):
        """Await `send()` (a call to a replica); when the replica died or is unavailable, send it again, up to
        serve.retry_attempts tries within serve.retry_deadline_s, then a clean 503."""
        deadline = time.monotonic() + self.settings["retry_deadline_s"]
        attempts = self.settings["retry_attempts"]
        for attempt in range(1, attempts + 1):
            try:
                return await send()
            except Exception as e:  # an ApiError from a replica keeps its status; anything else is a 5xx
                err = _as_api_error(e)
                if err is not None:
                    raise err from None
                if not isinstance(e, REPLICA_GONE):
                    raise
                left = deadline - time.monotonic()
                if attempt == attempts or left <= 0:
                    raise ApiError(503, "model", f"no model replica answered after {attempt} tries ({type(e).__name__}); "
                                   "retry") from None
                self.retries += 1
                # Serve drops a dead replica from its routing within a second or two: back off past that
                await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), left))

    # --- routes -------------------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self.scorer.info.remote(), timeout=10)
        except Exception as e:  # timeout, dead or restarting replica: unhealthy, not a 500
            return JSONResponse({"status": "unavailable", "error": type(e).__name__}, status_code=503)
        return {"status": "ok", "model": self.settings["model_id"], "rag": self.retriever is not None,
                "mode": self.mode_params.label(), "max_length": info["max_length"], "retries": self.retries}

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self._authorize(request)
        return api.openapi()

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings["model_id"], "object": "model",
                                            "owned_by": "stemqa", "created": self.settings["created"]}]}

    @api.post("/v1/mcqa", openapi_extra=MCQA_OPENAPI, responses={200: {"model": MCQAResponse}})
    async def mcqa(self, request: Request):
        start = time.perf_counter()
        body = await self._body(request, MCQARequest)
        check_mcqa(body, self.settings["max_choices"], self.settings["max_text_chars"])
        params = scoring_params(body.scoring, self.mode_params)
        passages: list[dict] = []
        if body.use_rag and self.retriever is None and "use_rag" in body.model_fields_set:
            raise ApiError(400, "use_rag", "this server has no RAG index; send use_rag=false")
        if body.use_rag and self.retriever is not None:
            # the question alone is the query, as `stemqa eval` retrieves, so served and evaluated prompts agree
            k = body.top_k or self.settings["top_k"]
            passages = await self._call(lambda: self.retriever.search.remote(body.question, k))
        result = await self._call(lambda: self.scorer.mcqa.remote(body.question, body.choices, body.subject,
                                                                  passages, params.model_dump()))
        probs, unsure = result["probabilities"], result["unsure"]
        fitted = self.fitted and params is self.mode_params
        return {
            "answer": result["answer"],
            "unsure": unsure,
            "confidence": max(probs),
            # how often it was right on dev on this side of the threshold: what "unsure" means for this answer
            "dev_accuracy": None if unsure is None else
            params.accuracy_when_unsure if unsure else params.accuracy_when_sure,
            "mode": result["mode"],
            "probabilities": {LETTERS[i]: p for i, p in enumerate(probs)},
            "calibration": params.model_dump(include={"temperature", "unsure_below", "accuracy_when_unsure",
                                                      "accuracy_when_sure", "model", "fitted_on"}) if fitted else None,
            "passages": [{"text": p["text"], "source": p.get("source"), "score": p.get("score")}
                         for p in result["passages"]],
            "model": self.settings["model_id"],
            "usage": {"tokens": result["tokens"]},
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }

    # --- OpenAI-compatible ------------------------------------------------------------------------------
    def _max_tokens(self, value: Optional[int], default: int) -> int:
        cap = self.settings["max_new_tokens"]
        value = default if value is None else value
        if value > cap:
            raise ApiError(422, "max_tokens", f"is {value}, more than this server's serve.max_new_tokens of {cap}")
        return value

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request, CompletionRequest)
        if body.stream:
            raise ApiError(422, "stream", "streaming is offered on /v1/chat/completions only")
        prompts = check_prompts(body.prompt, self.settings["max_text_chars"] * 4, self.settings["max_prompts"])
        check_stop(body.stop)
        max_tokens = self._max_tokens(body.max_tokens, 16)
        result = await self._call(lambda: self.scorer.completions.remote(
            prompts, max_tokens, body.temperature, body.top_p, body.stop, body.logprobs, body.echo, body.seed,
            body.n))
        usage = result["usage"]
        usage["total_tokens"] = usage["prompt_tokens"] + (usage["completion_tokens"] or 0)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.settings["model_id"], "choices": result["choices"], "usage": usage}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._body(request, ChatRequest)
        messages = check_messages(body.messages, self.settings["max_text_chars"] * 4, self.settings["max_messages"])
        check_stop(body.stop)
        max_tokens = self._max_tokens(body.max_tokens, self.settings["max_new_tokens"])
        ids, max_tokens = await self._call(lambda: self.scorer.chat_prompt.remote(messages, max_tokens))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.settings["model_id"]}
        if not body.stream:
            out = await self._call(lambda: self.scorer.chat.remote(ids, max_tokens, body.temperature, body.top_p,
                                                                   body.stop, body.seed))
            usage = dict(out["usage"], total_tokens=sum(out["usage"].values()))
            return {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": out["text"]},
                "finish_reason": out["finish_reason"]}]}
        # streamed: once the first event is sent a failure can only be reported inside the stream
        pieces = self.scorer.options(stream=True).chat_stream.remote(ids, max_tokens, body.temperature, body.top_p,
                                                                     body.stop, body.seed)
        return StreamingResponse(sse_chunks(head, pieces), media_type="text/event-stream")


def model_id(model_dir: str) -> str:
    path = Path(model_dir)
    return path.name if path.exists() else model_dir


def api_key_hash(env_var: str) -> Optional[str]:
    key = os.environ.get(env_var) if env_var else None
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def served_mode(path: Optional[str]) -> Optional[dict]:
    """The answer mode file (serve.mode_params) as a dict for the replicas (they may run where the file is not)."""
    if not path:
        return None
    try:
        return ModeParams.load(path).model_dump()
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"serve.mode_params: {e}") from None


def build_app(cfg: StemqaConfig, model_dir: str, index_dir: Optional[str] = None, mode_params: Optional[str] = None):
    """The Serve application: Ingress -> Scorer (autoscaled, batched) [+ Retriever when index_dir is given].
    `mode_params` (default serve.mode_params): the fitted answer mode /v1/mcqa answers in."""
    s = cfg.serve
    mode = served_mode(mode_params or s.mode_params)
    scorer = Scorer.options(**scorer_options(cfg)).bind(
        model_dir, s.max_batch_size, s.batch_wait_timeout_s, threads_for(s.cpus_per_replica),
        cfg.rag.token_budget, cfg.eval.subject_header, cfg.model.dtype, cfg.model.trust_remote_code,
        s.gen_batch_wait_timeout_s, s.max_request_tokens, s.echo_chunk_tokens, mode)
    retriever = None
    if index_dir:
        retriever = Retriever.options(**retriever_options(cfg)).bind(
            index_dir, s.max_batch_size, s.batch_wait_timeout_s, threads_for(s.retriever_cpus))
    settings = {"model_id": model_id(model_dir), "created": int(time.time()), "max_choices": s.max_choices,
                "max_text_chars": s.max_text_chars, "top_k": cfg.rag.top_k, "max_new_tokens": s.max_new_tokens,
                "api_key_sha256": api_key_hash(s.api_key_env), "max_request_bytes": s.max_request_bytes,
                "max_prompts": s.max_prompts, "max_messages": s.max_messages, "retry_attempts": s.retry_attempts,
                "retry_deadline_s": s.retry_deadline_s, "mode_params": mode}
    actor = {"num_cpus": s.ingress_cpus}
    if s.ingress_resource:
        actor["resources"] = {s.ingress_resource: 0.001}
    ingress = Ingress.options(ray_actor_options=actor, max_ongoing_requests=1000, logging_config=quiet_logging(),
                              health_check_period_s=s.health_check_period_s,
                              health_check_timeout_s=s.health_check_timeout_s)
    return ingress.bind(scorer, retriever, settings)


def app_builder(args: dict):
    """For `serve run serve/config.yaml`: args {config, model, index, run, mode_params, set: [a.b=v, ...]}."""
    from serve.sources import resolve_sources
    from stemqa.config import load_config

    cfg = load_config(args.get("config") or "demo", args.get("set") or [])
    model_dir, index_dir = resolve_sources(cfg, args.get("model"), args.get("index"), args.get("run"))
    return build_app(cfg, model_dir, index_dir, args.get("mode_params"))
