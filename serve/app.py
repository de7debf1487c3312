"""The stemqa Serve app: a FastAPI ingress in front of the scorer (the LM) and the retriever (FAISS index).

    POST /v1/mcqa   {question, choices[], use_rag=true, top_k, subject}
                    -> {answer, probabilities {A: p, ...}, passages [{text, source, score}], model, latency_ms}
    GET  /healthz   200 when the scorer answers, 503 otherwise (no API key needed)
    GET  /v1/models OpenAI-style model list

`build_app(cfg, model_dir, index_dir)` returns the Serve application; `app_builder(args)` is the same for
`serve run serve/config.yaml` / `serve deploy`. The API key is read from the environment variable named by
`serve.api_key_env` when the app is built; only its SHA-256 travels to the replicas.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.deployments import Retriever, Scorer, quiet_logging, retriever_options, scorer_options, threads_for
from serve.schemas import ApiError, MCQARequest, check_mcqa, validation_error_body
from stemqa.config import StemqaConfig
from stemqa.data.mcq import LETTERS

STATIC = Path(__file__).resolve().parent / "static"

api = FastAPI(title="stemqa", description="STEM multiple-choice study assistant", docs_url=None, redoc_url=None)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    status, body = validation_error_body(list(exc.errors()))
    return JSONResponse(body, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


def _as_api_error(exc: BaseException) -> Optional[ApiError]:
    """An ApiError raised in a replica reaches the ingress wrapped in a RayTaskError; unwrap it."""
    for e in (exc, getattr(exc, "cause", None)):
        if isinstance(e, ApiError):
            return ApiError(e.status, e.field, e.message)
    return None


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, scorer: DeploymentHandle, retriever: Optional[DeploymentHandle], settings: dict):
        self.scorer, self.retriever, self.settings = scorer, retriever, settings

    # --- helpers ------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        expected = self.settings.get("api_key_sha256")
        if not expected:
            return
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not key or not hmac.compare_digest(hashlib.sha256(key.encode()).hexdigest(), expected):
            raise ApiError(401, "authorization", "a valid API key is required (Authorization: Bearer <key>)")

    async def _call(self, response):
        try:
            return await response
        except Exception as e:  # an ApiError from a replica keeps its status; anything else is a 5xx
            err = _as_api_error(e)
            if err is not None:
                raise err from None
            raise

    # --- routes -------------------------------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self):
        try:
            info = await self.scorer.info.options(timeout_s=10).remote()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": type(e).__name__}, status_code=503)
        return {"status": "ok", "model": self.settings["model_id"], "rag": self.retriever is not None,
                "max_length": info["max_length"]}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.settings["model_id"], "object": "model",
                                            "owned_by": "stemqa", "created": self.settings["created"]}]}

    @api.post("/v1/mcqa")
    async def mcqa(self, body: MCQARequest, request: Request):
        start = time.perf_counter()
        self._authorize(request)
        check_mcqa(body, self.settings["max_choices"], self.settings["max_text_chars"])
        passages: list[dict] = []
        if body.use_rag and self.retriever is None and "use_rag" in body.model_fields_set:
            raise ApiError(400, "use_rag", "this server has no RAG index; send use_rag=false")
        if body.use_rag and self.retriever is not None:
            query = body.question + "\n" + "\n".join(body.choices)
            passages = await self._call(self.retriever.search.remote(query, body.top_k or self.settings["top_k"]))
        result = await self._call(self.scorer.mcqa.remote(body.question, body.choices, body.subject,
                                                          [p["text"] for p in passages]))
        used = passages[:result["passages_used"]]
        return {
            "answer": result["answer"],
            "probabilities": {LETTERS[i]: p for i, p in enumerate(result["probabilities"])},
            "passages": [{"text": p["text"], "source": p.get("source"), "score": p.get("score")} for p in used],
            "model": self.settings["model_id"],
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }


def model_id(model_dir: str) -> str:
    path = Path(model_dir)
    return path.name if path.exists() else model_dir


def api_key_hash(env_var: str) -> Optional[str]:
    key = os.environ.get(env_var) if env_var else None
    return hashlib.sha256(key.encode()).hexdigest() if key else None


def build_app(cfg: StemqaConfig, model_dir: str, index_dir: Optional[str] = None):
    """The Serve application: Ingress -> Scorer (autoscaled, batched) [+ Retriever when index_dir is given]."""
    s = cfg.serve
    scorer = Scorer.options(**scorer_options(cfg)).bind(
        model_dir, s.max_batch_size, s.batch_wait_timeout_s, threads_for(s.cpus_per_replica),
        cfg.rag.token_budget, cfg.eval.subject_header, cfg.model.dtype, cfg.model.trust_remote_code)
    retriever = None
    if index_dir:
        retriever = Retriever.options(**retriever_options(cfg)).bind(
            index_dir, s.max_batch_size, s.batch_wait_timeout_s, threads_for(s.retriever_cpus))
    settings = {"model_id": model_id(model_dir), "created": int(time.time()), "max_choices": s.max_choices,
                "max_text_chars": s.max_text_chars, "top_k": cfg.rag.top_k, "max_new_tokens": s.max_new_tokens,
                "api_key_sha256": api_key_hash(s.api_key_env)}
    ingress = Ingress.options(ray_actor_options={"num_cpus": s.ingress_cpus}, max_ongoing_requests=1000,
                              logging_config=quiet_logging())
    return ingress.bind(scorer, retriever, settings)


def app_builder(args: dict):
    """For `serve run serve/config.yaml`: args {config, model, index, run, set: [a.b=v, ...]}."""
    from serve.sources import resolve_sources
    from stemqa.config import load_config

    cfg = load_config(args.get("config") or "demo", args.get("set") or [])
    model_dir, index_dir = resolve_sources(cfg, args.get("model"), args.get("index"), args.get("run"))
    return build_app(cfg, model_dir, index_dir)
