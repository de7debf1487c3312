"""`stemqa serve`: deploy the Ray Serve app (RAG + model) and answer one sample question over HTTP.

    stemqa serve --config demo --model DIR [--index DIR] [--run RUN_DIR] [--block]

The model and index come from --model/--index, else from a pipeline run directory (--run: its quantized,
else DPO, else SFT model, and its RAG index), else from serve.model_dir / serve.index_dir / model.name.
On a cluster the app keeps serving after this job ends; on a private local Ray it lives as long as this
process, so pass --block to keep it up (Ctrl-C stops it).
"""
from __future__ import annotations

import os
import time
from typing import Optional

from jobs.common import config_from, connect, parser, print_json
from stemqa.config import StemqaConfig

APP_NAME = "stemqa"
SAMPLE = {"question": "What is the SI unit of electric charge?", "choices": ["volt", "coulomb", "ampere", "ohm"]}


def deploy(cfg: StemqaConfig, model_dir: str, index_dir: Optional[str] = None) -> str:
    """Start Serve on serve.host:serve.port (127.0.0.1 by default), deploy the app; returns its base URL."""
    from ray import serve

    from serve.app import build_app

    if cfg.cluster.quiet:  # the driver-side Serve logger prints INFO lines on start and deploy
        import logging

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location=cfg.serve.proxy_location, http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, model_dir, index_dir), name=APP_NAME, route_prefix="/", blocking=False)
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


def main(argv=None) -> int:
    p = parser("stemqa serve", __doc__)
    p.add_argument("--model", default=None, help="model directory or name (default: from --run or the config)")
    p.add_argument("--index", default=None, help="RAG index directory (default: from --run or serve.index_dir)")
    p.add_argument("--question", default=SAMPLE["question"], help="the sample question to ask once deployed")
    p.add_argument("--choices", nargs="+", default=SAMPLE["choices"], help="its options")
    p.add_argument("--block", action="store_true", help="keep serving until Ctrl-C")
    args = p.parse_args(argv)
    cfg = config_from(args)

    from serve.sources import resolve_sources

    model_dir, index_dir = resolve_sources(cfg, args.model, args.index, args.run)
    connect(cfg)
    t0 = time.time()
    url = deploy(cfg, model_dir, index_dir)
    print(f"serving {model_dir} (index: {index_dir or 'none'}) at {url}  [{time.time() - t0:.0f} s to deploy]")
    answer = ask(url, args.question, args.choices, api_key=os.environ.get(cfg.serve.api_key_env) or None)
    print(f"Q: {args.question}  options: {args.choices}")
    print_json(answer)
    if args.block:
        print(f"serving at {url}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
