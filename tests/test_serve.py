"""The Serve app over real HTTP: one deployment (tiny Qwen3 + a tiny real FAISS index) for the module.

Deploying costs ~20-40 s on 2 CPUs (replica start-up), so every test here shares one app on port 8123,
deployed with an API key in the environment; requests carry the key unless a test is about the key.
"""
import asyncio
import os

import httpx
import pytest

from serve.schemas import MCQARequest, check_mcqa, ApiError

PORT = int(os.environ.get("STEMQA_TEST_SERVE_PORT", "8123"))
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}

QUESTIONS = [
    ("What is the SI unit of electric charge?", ["volt", "coulomb", "ampere", "ohm"]),
    ("Which particle has a negative charge?", ["proton", "neutron", "electron"]),
    ("What force keeps planets in orbit around the Sun?", ["friction", "magnetism", "gravity", "tension", "drag"]),
    ("Water boils at sea level at", ["50 C", "100 C"]),
]


@pytest.fixture(scope="module")
def app_url(ray_local, tiny_model, tmp_path_factory):
    from ray import serve

    from stemqa.config import load_config
    from stemqa.data.paths import SAMPLE_DATA
    from stemqa.rag import build_index

    cfg = load_config("demo", [f"serve.port={PORT}", "serve.autoscaling.max_replicas=1",
                               "serve.cpus_per_replica=0.5", "rag.top_k=2"])
    cfg.rag.corpus = [cfg.rag.corpus[0].model_copy(update={"limit": 30})]
    index_dir = build_index(cfg.rag, SAMPLE_DATA, tmp_path_factory.mktemp("index") / "index")
    yield deploy_with_key(cfg, tiny_model, str(index_dir))
    serve.shutdown()


def deploy_with_key(cfg, model, index_dir):
    """Deploy with the API key in the environment, as an operator would; the env is restored after."""
    from stemqa.stages.serve import deploy

    old = os.environ.get(cfg.serve.api_key_env)
    os.environ[cfg.serve.api_key_env] = KEY
    try:
        return deploy(cfg, model, index_dir)
    finally:
        if old is None:
            os.environ.pop(cfg.serve.api_key_env)
        else:
            os.environ[cfg.serve.api_key_env] = old


def post(url, body, headers=AUTH, **kw):
    return httpx.post(f"{url}/v1/mcqa", json=body, headers=headers, timeout=60, **kw)


def test_mcqa_answers_with_probabilities_and_passages(app_url):
    r = post(app_url, {"question": QUESTIONS[0][0], "choices": QUESTIONS[0][1], "top_k": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out["probabilities"]) == {"A", "B", "C", "D"}
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert out["answer"] == max(out["probabilities"], key=out["probabilities"].get)
    assert out["model"] == "tiny-qwen3" and out["latency_ms"] > 0
    # the tiny index is real OpenStax physics: passages come back with their source and similarity
    assert 1 <= len(out["passages"]) <= 2
    for p in out["passages"]:
        assert p["text"].strip() and p["source"] and -1.0 <= p["score"] <= 1.0
    assert out["passages"][0]["score"] >= out["passages"][-1]["score"]


def test_mcqa_matches_the_scorer_in_a_batch(app_url, tiny_model):
    """Concurrent requests (batched by @serve.batch) give the same answers as MCQScorer in-process."""
    from stemqa.data.mcq import MCQ
    from stemqa.eval.scorer import MCQScorer
    from stemqa.models import load_causal_lm, load_tokenizer

    async def ask_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[
                client.post(f"{app_url}/v1/mcqa", headers=AUTH,
                            json={"question": q, "choices": c, "use_rag": False}) for q, c in QUESTIONS])

    responses = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    scorer = MCQScorer(load_causal_lm(tiny_model), load_tokenizer(tiny_model), batch_size=1)
    records = [MCQ(f"q{i}", "science", q, c, 0, "test") for i, (q, c) in enumerate(QUESTIONS)]
    for pred, r in zip(scorer.score(records), responses):
        out = r.json()
        assert out["passages"] == []
        assert out["answer"] == pred.pred
        assert list(out["probabilities"].values()) == pytest.approx(pred.probabilities, abs=1e-4)


def test_api_key_required(app_url):
    body = {"question": QUESTIONS[0][0], "choices": QUESTIONS[0][1], "use_rag": False}
    assert post(app_url, body, headers={}).status_code == 401
    wrong = post(app_url, body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["field"] == "authorization"
    assert post(app_url, body, headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(f"{app_url}/v1/models", timeout=30).status_code == 401


@pytest.mark.parametrize("body,status,field", [
    ({"choices": ["a", "b"]}, 422, "question"),
    ({"question": "q"}, 422, "choices"),
    ({"question": "q", "choices": ["only one"]}, 422, "choices"),
    ({"question": "q", "choices": [f"o{i}" for i in range(27)]}, 422, "choices"),
    ({"question": "   ", "choices": ["a", "b"]}, 422, "question"),
    ({"question": "q", "choices": ["a", ""]}, 422, "choices[1]"),
    ({"question": "x" * 4001, "choices": ["a", "b"]}, 422, "question"),
    ({"question": "q", "choices": ["a", "b" * 4001]}, 422, "choices[1]"),
    ({"question": "q", "choices": "a,b"}, 422, "choices"),
    ({"question": 7, "choices": ["a", "b"]}, 422, "question"),
    ({"question": "q", "choices": ["a", "b"], "top_k": 0}, 422, "top_k"),
    ({"question": "q", "choices": ["a", "b"], "colour": "red"}, 422, "colour"),
    # within every text limit, but the prompt is longer than the model's context (2048 tokens)
    ({"question": "why " * 900, "choices": ["because " * 450] * 4, "use_rag": False}, 413, "question"),
])
def test_bad_input_is_a_4xx_naming_the_field(app_url, body, status, field):
    r = post(app_url, body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field in r.json()["error"]


def test_malformed_json_is_400(app_url):
    r = httpx.post(f"{app_url}/v1/mcqa", content=b'{"question": "q", "choices": [', timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body"


def test_healthz_and_models(app_url):
    h = httpx.get(f"{app_url}/healthz", timeout=30)  # no key: health checks come from load balancers
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["rag"] is True
    m = httpx.get(f"{app_url}/v1/models", headers=AUTH, timeout=30).json()
    assert [d["id"] for d in m["data"]] == ["tiny-qwen3"]


def test_check_mcqa_limits_without_a_server():
    check_mcqa(MCQARequest(question="q", choices=["a", "b"]), max_choices=3, max_chars=10)
    with pytest.raises(ApiError, match="choices: has 4 options"):
        check_mcqa(MCQARequest(question="q", choices=list("abcd")), max_choices=3, max_chars=10)


def test_length_groups_bound_the_padding():
    from serve.deployments import length_groups

    lengths = [136, 46, 90, 91, 50, 125, 86, 47, 52, 112, 110, 60]
    groups = length_groups(lengths, max_waste=0.10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every item once
    for g in groups:
        assert lengths[g[0]] == max(lengths[i] for i in g)  # the group is padded to its first (longest)
        assert len(g) * lengths[g[0]] <= 1.10 * sum(lengths[i] for i in g)
    assert len(groups) < len(lengths)  # similar lengths do share a forward pass
    assert length_groups([70] * 16) == [list(range(16))]  # equal lengths: one pass, no padding
    assert length_groups([]) == []


def test_scorer_stats_count_the_requests(app_url):
    """The scorer's counters (read by the benchmark) see every scored request, with one torch thread per CPU."""
    from ray import serve

    scorer = serve.get_deployment_handle("Scorer", app_name="stemqa")
    before = scorer.stats.remote().result(timeout_s=60)
    responses = asyncio.run(_burst(app_url, 6))
    assert all(r.status_code == 200 for r in responses)
    after = scorer.stats.remote().result(timeout_s=60)
    assert after["items"] - before["items"] == 6
    assert 1 <= after["forward_passes"] - before["forward_passes"] <= 6
    assert after["torch_threads"] == 1 and after["pid"] > 0  # serve.cpus_per_replica=0.5 -> 1 thread


# --- OpenAI-compatible endpoints -------------------------------------------------------------------------
def test_completions_echo_logprobs_equal_the_scorer(app_url, tiny_model):
    """echo + logprobs: the prompt's token log-probs sum to MCQScorer.loglikelihoods of the same pair."""
    from stemqa.eval.scorer import MCQScorer
    from stemqa.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model)
    scorer = MCQScorer(load_causal_lm(tiny_model), tok, batch_size=2)
    pairs = [("Question: 2+2=?\nAnswer:", " B"), ("The unit of force is the", " newton")]
    ctx_ids = [scorer.encode_pair(c, x) for c, x in pairs]
    r = httpx.post(f"{app_url}/v1/completions", headers=AUTH, timeout=60, json={
        "prompt": [c + x for c, x in ctx_ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    for choice, (c, x), expected in zip(out["choices"], ctx_ids, scorer.loglikelihoods(pairs)):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(c) + len(x) + 1 and lp["token_logprobs"][0] is None
        assert sum(lp["token_logprobs"][len(c):-1]) == pytest.approx(expected, abs=1e-3)
        # the generated token is the greedy one, so it tops its own top_logprobs
        assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()), abs=1e-5)


def test_completions_generate_and_stop(app_url):
    body = {"prompt": "Photosynthesis makes", "max_tokens": 6, "temperature": 0}
    first = httpx.post(f"{app_url}/v1/completions", headers=AUTH, json=body, timeout=60).json()
    again = httpx.post(f"{app_url}/v1/completions", headers=AUTH, json=body, timeout=60).json()
    text = first["choices"][0]["text"]
    assert text and text == again["choices"][0]["text"]  # greedy is deterministic
    assert first["usage"]["prompt_tokens"] > 0
    stop = text.strip().split()[0]
    cut = httpx.post(f"{app_url}/v1/completions", headers=AUTH, json={**body, "stop": [stop]}, timeout=60).json()
    assert stop not in cut["choices"][0]["text"] and cut["choices"][0]["finish_reason"] == "stop"


def test_concurrent_completions_are_batched_and_answer_as_alone(app_url):
    """Unseeded greedy completions sent together share @serve.batch calls (fewer generate calls than requests)
    and each gets the text it gets alone; logprobs in a batch line up with the text."""
    from ray import serve

    prompts = ["Photosynthesis makes", "The heart pumps", "Gravity pulls objects", "An atom has a nucleus and",
               "Acids turn litmus paper", "Light travels at"]
    alone = [httpx.post(f"{app_url}/v1/completions", headers=AUTH, timeout=60,
                        json={"prompt": p, "max_tokens": 8, "temperature": 0}).json() for p in prompts]
    scorer = serve.get_deployment_handle("Scorer", app_name="stemqa")
    before = scorer.stats.remote().result(timeout_s=60)

    async def together():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{app_url}/v1/completions", headers=AUTH, json={
                "prompt": p, "max_tokens": 8, "temperature": 0, "logprobs": 1}) for p in prompts])

    responses = asyncio.run(together())
    after = scorer.stats.remote().result(timeout_s=60)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert after["gen_items"] - before["gen_items"] == len(prompts)
    assert after["generate_calls"] - before["generate_calls"] < len(prompts)  # some shared one generate
    for r, a in zip(responses, alone):
        choice = r.json()["choices"][0]
        assert choice["text"] == a["choices"][0]["text"]
        lp = choice["logprobs"]
        assert 1 <= len(lp["tokens"]) == len(lp["token_logprobs"]) <= 8 and all(x <= 0 for x in lp["token_logprobs"])
        # greedy: each generated token tops its own top_logprobs
        assert all(x == pytest.approx(max(top.values()), abs=1e-5) for x, top in zip(lp["token_logprobs"],
                                                                                      lp["top_logprobs"]))


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": list(range(100, 2200))}, "prompt"),  # over the 2048-token context
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
])
def test_openai_bad_input_is_a_4xx(app_url, path, body, field):
    r = httpx.post(f"{app_url}{path}", headers=AUTH, json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["field"] == field


def test_chat_completions_plain_and_streamed(app_url):
    body = {"messages": [{"role": "user", "content": "Name a noble gas."}], "max_tokens": 8, "temperature": 0}
    plain = httpx.post(f"{app_url}/v1/chat/completions", headers=AUTH, json=body, timeout=60).json()
    assert plain["object"] == "chat.completion" and plain["choices"][0]["message"]["role"] == "assistant"
    import json

    deltas, done = [], False
    with httpx.stream("POST", f"{app_url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert chunk["object"] == "chat.completion.chunk"
                deltas.append(chunk["choices"][0]["delta"].get("content", ""))
    assert done and len([d for d in deltas if d]) >= 2  # arrived in pieces
    # greedy: the streamed text is the plain reply
    assert "".join(deltas).strip() == plain["choices"][0]["message"]["content"].strip()


def test_lm_eval_local_completions_scores_the_live_server(app_url, tiny_model, tmp_path, monkeypatch):
    """lm-eval-harness's local-completions model against the server = stemqa's scorer on the same items."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from stemqa.data.mcq import load_sources
    from stemqa.data.paths import SAMPLE_DATA
    from stemqa.config.schema import McqSource
    from stemqa.eval.lmeval_task import write_lmeval_task
    from stemqa.eval.scorer import MCQScorer
    from stemqa.models import load_causal_lm, load_tokenizer

    records, _ = load_sources([McqSource(path="mcq/mmlu/test/college_physics_test.csv", format="mmlu_csv", limit=6)],
                              SAMPLE_DATA)
    task = write_lmeval_task(records, tmp_path / "task")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(tmp_path / "task")),
        model_args=f"model=tiny-qwen3,base_url={app_url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={tiny_model},num_concurrent=1,max_retries=1,tokenized_requests=True",
        batch_size=4, num_fewshot=0, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    served = [max(range(len(s["resps"])), key=lambda i: float(s["resps"][i][0][0])) for s in samples]
    preds = MCQScorer(load_causal_lm(tiny_model), load_tokenizer(tiny_model)).score(records)
    assert [p.pred for p in preds] == ["ABCDEFGH"[i] for i in served]
    assert out["results"][task]["acc,none"] == pytest.approx(sum(p.pred == p.gold for p in preds) / len(preds))


# --- the web page, in a real headless Chromium ---------------------------------------------------------
CHROMIUM = os.environ.get("STEMQA_CHROMIUM", "/usr/bin/chromium")


def test_web_page_in_headless_chromium(app_url):
    """A student asks on the page: the answer, one confidence bar per option, passages with sources."""
    from pathlib import Path

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set STEMQA_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2")
    from conftest import ARTIFACTS

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    choices = ["volt", "coulomb", "ampere", "ohm"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 1100})
        external = []  # the page must load nothing from outside the server (no CDN)
        page.on("request", lambda req: external.append(req.url) if not req.url.startswith(app_url) else None)
        page.goto(app_url + "/")
        page.fill("#question", "What is the SI unit of electric charge?")
        page.fill("#choices", "\n".join(choices))
        page.fill("#api_key", KEY)
        page.click("#submit")
        page.wait_for_selector("#answer", timeout=60_000)
        answer = page.inner_text("#answer")
        assert answer[0] in "ABCD" and answer[3:] == choices["ABCD".index(answer[0])]
        bars = page.locator(".option .bar")
        assert bars.count() == 4
        pcts = [float(bars.nth(i).get_attribute("aria-valuenow")) for i in range(4)]
        assert sum(pcts) == pytest.approx(100, abs=0.5)
        assert page.locator("#passages .passage").count() >= 1
        assert "source:" in page.inner_text("#passages")
        page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)

        # a bad request shows the server's error, naming the field
        page.fill("#choices", "only one option")
        page.click("#submit")
        page.wait_for_selector("#error", timeout=30_000)
        assert "choices" in page.inner_text("#error")

        # a free question (no options) streams a reply from the chat endpoint
        page.fill("#choices", "")
        page.click("#submit")
        page.wait_for_function("document.querySelector('#reply') && document.querySelector('#reply').textContent.length > 0",
                               timeout=60_000)
        browser.close()
    assert external == []


# --- under load and under failure (slow: each waits for replicas to start, ~15-40 s apiece on 2 CPUs) -------
def _scorer_replicas(app="stemqa") -> dict:
    from ray import serve

    return dict(serve.status().applications[app].deployments["Scorer"].replica_states)


def _redeploy(tiny_model, **overrides):
    """Update the module's app in place (same name and port) with other serve settings and no index."""
    from stemqa.config import load_config

    sets = [f"serve.port={PORT}"] + [f"serve.{k}={v}" for k, v in overrides.items()]
    return deploy_with_key(load_config("demo", sets), tiny_model, None)


async def _burst(url, n):
    body = {"question": QUESTIONS[0][0], "choices": QUESTIONS[0][1], "use_rag": False}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(*[client.post(f"{url}/v1/mcqa", json=body, headers=AUTH) for _ in range(n)])


@pytest.mark.slow
def test_200_concurrent_requests_no_5xx_and_the_autoscaler_adds_a_replica(app_url, tiny_model):
    import time

    url = _redeploy(tiny_model, **{"autoscaling.min_replicas": 1, "autoscaling.max_replicas": 2,
                                   "autoscaling.upscale_delay_s": 1, "cpus_per_replica": 0.5})
    statuses, seen, deadline = [], {}, time.time() + 90
    while time.time() < deadline:  # bursts of 200 until Serve status shows a second replica
        statuses += [r.status_code for r in asyncio.run(_burst(url, 200))]
        seen = _scorer_replicas()
        if sum(seen.values()) >= 2:
            break
    assert sum(seen.values()) >= 2, f"no second replica after {len(statuses)} requests: {seen}"
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_the_service_answers_again(app_url, tiny_model):
    import threading
    import time

    import ray

    def scorer_replicas():  # named actors of this Ray instance (the state API can pick another local instance)
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::stemqa#Scorer#")]

    url = _redeploy(tiny_model, **{"autoscaling.min_replicas": 1, "autoscaling.max_replicas": 1,
                                   "health_check_period_s": 2, "health_check_timeout_s": 10})
    assert asyncio.run(_burst(url, 4))[0].status_code == 200

    outcomes, stop = [], threading.Event()

    def keep_asking():  # load during the kill: every request must end with a status, none hang
        while not stop.is_set():
            started = time.time()
            try:
                r = httpx.post(f"{url}/v1/mcqa", headers=AUTH, timeout=60,
                               json={"question": "Is ice water?", "choices": ["yes", "no"], "use_rag": False})
                outcomes.append((started, time.time(), r.status_code))
            except httpx.HTTPError as e:
                outcomes.append((started, time.time(), type(e).__name__))

    threads = [threading.Thread(target=keep_asking) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    victims = scorer_replicas()
    assert len(victims) == 1
    ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
    killed_at = time.time()
    recovered = None
    while time.time() - killed_at < 120:
        # answering again = 4 successes of requests sent after the kill (queued ones count: Serve retried them)
        after = [end for start, end, status in list(outcomes) if start > killed_at and status == 200]
        if len(after) >= 4:
            recovered = sorted(after)[3] - killed_at
            break
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert recovered is not None, f"no recovery: last outcomes {outcomes[-10:]}"
    # failures in between were clean HTTP answers (503 from the ingress, or Serve's 500), never hangs
    statuses = [status for _, _, status in outcomes]
    assert all(o in (200, 500, 503) for o in statuses), sorted(set(map(str, statuses)))
    replicas = scorer_replicas()
    assert len(replicas) == 1 and replicas[0] != victims[0]
    print(f"replica replaced; answering again {recovered:.1f} s after the kill; outcomes: "
          f"{ {str(o): statuses.count(o) for o in set(statuses)} }")
