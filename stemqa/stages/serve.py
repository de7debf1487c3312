"""serve: deploy the Ray Serve app (RAG + model) on the cluster and ask it one question over HTTP.

The app is deployed by import path, as `serve run serve/config.yaml`, `serve deploy` and KubeRay's RayService
do: `serve.app` names the app builder (default `serve.app:app_builder`, the repository's serve/ package), which
gets {config, model, index}: the resolved stemqa config written as YAML into the stage directory (so the
deployment can be repeated with `serve run`), and the model and index to serve. The library never imports the
app's code itself; the builder runs in this process, so the API key (read from the environment where the app is
built) never travels in the deployment's arguments.

On a cluster the app keeps serving after this stage (and its job) ends; on a private local Ray it lives as long
as the process, so `stemqa serve --block` keeps it up until Ctrl-C.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.config import StemqaConfig, to_yaml
from stemqa.runs import Run
from stemqa.stages.base import Stage, StageContext, StageResult, artifact

APP_NAME = "stemqa"
SAMPLE = {"question": "What is the SI unit of electric charge?", "choices": ["volt", "coulomb", "ampere", "ohm"]}
# Without a select stage, the run's last model: the quantized one is what students are meant to meet.
MODEL_STAGES = ("quant", "dpo", "sft")


class ServeInputs(BaseModel):
    model: str
    index: Optional[str] = None
    question: str = SAMPLE["question"]
    choices: list[str] = SAMPLE["choices"]
    block: bool = False  # keep serving until Ctrl-C (a private local Ray ends with this process)
    mode_params: Optional[str] = None  # the answer mode /v1/mcqa answers in (the select stage's choice)


def serving_sources(cfg: StemqaConfig, model: Optional[str] = None, index: Optional[str] = None,
                    run: Optional[Run] = None) -> tuple[str, Optional[str]]:
    """(model, index or None): what was given, else the run's best model and its RAG index, else serve.model_dir /
    serve.index_dir / model.name."""
    if run is not None and model is None and run.stage_status("select") == "done":
        chosen = run.manifest()["stages"]["select"]["metrics"]["chosen_model"]  # what the dev selection chose
        model = cfg.model.name if chosen == "base" else str(run.artifact(chosen, "model"))
    if run is not None:
        model = model or artifact(run, *((s, "model") for s in MODEL_STAGES))
        if index is None and cfg.rag.enabled:
            index = artifact(run, ("rag", "index"))
    return model or cfg.serve.model_dir or cfg.model.name, index or cfg.serve.index_dir


def app_builder(import_path: str):
    """The callable `module:attr` names (Ray Serve's import-path form)."""
    module, _, attr = import_path.partition(":")
    if not attr:
        raise ValueError(f"serve.app {import_path!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), attr)


def deploy(cfg: StemqaConfig, model_dir: str, index_dir: Optional[str] = None,
           config_dir: Optional[Path] = None) -> str:
    """Start Serve on serve.host:serve.port (127.0.0.1 by default), deploy the app; returns its base URL.
    The resolved config the builder reads is written to `config_dir`/app_config.yaml (a temporary file without)."""
    from ray import serve

    if cfg.cluster.quiet:  # the driver-side Serve logger prints INFO lines on start and deploy
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location=cfg.serve.proxy_location,
                http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    with tempfile.TemporaryDirectory(prefix="stemqa-serve-") as tmp:
        path = Path(config_dir or tmp) / "app_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_yaml(cfg))
        app = app_builder(cfg.serve.app)({"config": str(path), "model": model_dir, "index": index_dir})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def ask(url: str, question: str, choices: list[str], api_key: Optional[str] = None, use_rag: bool = True,
        top_k: Optional[int] = None, timeout: float = 120.0) -> dict:
    """POST /v1/mcqa; raises httpx.HTTPStatusError (with the server's error body) on a 4xx/5xx."""
    import httpx

    body = {"question": question, "choices": choices}
    if not use_rag:
        body["use_rag"] = False
    if top_k is not None:
        body["top_k"] = top_k
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.post(f"{url.rstrip('/')}/v1/mcqa", json=body, headers=headers, timeout=timeout)
    if resp.is_error:
        raise httpx.HTTPStatusError(f"{resp.status_code} from {resp.url}: {resp.text}", request=resp.request,
                                    response=resp)
    return resp.json()


class ServeStage(Stage):
    name = "serve"
    Inputs = ServeInputs
    description = "start the Ray Serve app (RAG + model) and answer over HTTP"
    rerun_on_resume = True  # the app is (re)deployed on every run

    def add_arguments(self, p) -> None:
        p.add_argument("--model", default=None, help="model directory or name (default: from --run or the config)")
        p.add_argument("--index", default=None, help="RAG index directory (default: from --run or serve.index_dir)")
        p.add_argument("--question", default=SAMPLE["question"], help="the sample question to ask once deployed")
        p.add_argument("--choices", nargs="+", default=SAMPLE["choices"], help="its options")
        p.add_argument("--block", action="store_true", help="keep serving until Ctrl-C")

    def inputs_from_args(self, args, ctx: StageContext) -> ServeInputs:
        model, index = serving_sources(ctx.cfg, args.model, args.index, ctx.run)
        return ServeInputs(model=model, index=index, question=args.question, choices=args.choices, block=args.block)

    def inputs_from_run(self, ctx: StageContext) -> ServeInputs:
        model, index = serving_sources(ctx.cfg, run=ctx.run)
        return ServeInputs(model=model, index=index, mode_params=artifact(ctx.run, ("select", "mode_params")))

    def manifest_inputs(self, inputs: ServeInputs, run: Run) -> dict:
        return {k: v for k, v in super().manifest_inputs(inputs, run).items()
                if k in ("model", "index", "mode_params")}

    def run(self, ctx: StageContext, inputs: ServeInputs) -> StageResult:
        cfg, out = ctx.cfg, Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if inputs.mode_params:
            cfg = cfg.model_copy(deep=True)
            cfg.serve.mode_params = inputs.mode_params
        t0 = time.time()
        url = deploy(cfg, inputs.model, inputs.index, out)
        print(f"[serve] serving {inputs.model} (index: {inputs.index or 'none'}) at {url}  "
              f"[{time.time() - t0:.0f} s to deploy]", file=sys.stderr, flush=True)
        answer = ask(url, inputs.question, inputs.choices, api_key=os.environ.get(cfg.serve.api_key_env) or None)
        (out / "answer.json").write_text(json.dumps(answer, indent=2))
        if inputs.block:
            print(f"serving at {url}; Ctrl-C to stop", file=sys.stderr, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        mode = answer.get("mode") or answer.get("scoring") or "letter"
        said = "unsure (top: " + str(answer["answer"]) + ")" if answer.get("unsure") else answer["answer"]
        return StageResult(summary=f"{url}/v1/mcqa ({mode}) answered {said} to {inputs.question!r}",
                           metrics={"url": url, "answer": answer["answer"]},
                           artifacts={"answer": str(out / "answer.json")})

    def show(self, result: StageResult) -> None:
        print(Path(result.artifacts["answer"]).read_text())


STAGE = ServeStage()
