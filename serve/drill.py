"""Load and fault drills against a running stemqa app, over real HTTP (tests/test_serve_cluster.py and
benchmarks/bench_reliability.py run them; nothing here imports the app).

    requests = mixed_requests(200)                       # good and bad requests of every route
    outcomes = asyncio.run(send_all(url, requests, key))  # all at once
    summary = summarize(outcomes)                         # statuses, p50/p99, what went wrong

`Sustained` keeps a few clients asking while a fault drill kills replicas or nodes, and records every
outcome with its start time, so a drill can tell what failed and when answers came back.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

QUESTIONS = [
    ("What is the SI unit of electric charge?", ["volt", "coulomb", "ampere", "ohm"]),
    ("Which particle has a negative charge?", ["proton", "neutron", "electron"]),
    ("What force keeps planets in orbit around the Sun?", ["friction", "magnetism", "gravity", "tension"]),
    ("Water boils at sea level at", ["50 C", "100 C"]),
]


@dataclass
class Request:
    kind: str  # mcqa_rag, mcqa, completion, echo, chat; bad requests: bad:<what is wrong>
    path: str
    body: Optional[dict] = None
    raw: Optional[bytes] = None  # sent as is instead of body (bad JSON, oversized)
    auth: bool = True

    @property
    def bad(self) -> bool:
        return self.kind.startswith("bad:")


@dataclass
class Outcome:
    kind: str
    status: object  # the HTTP status, or the name of the transport error
    started: float  # time.time() when sent
    latency_s: float
    ok: bool  # good request: 200 with an answer; bad one: a 4xx whose body names the error and the field
    detail: str = ""


def good_requests() -> list[Request]:
    out = []
    for q, c in QUESTIONS:
        out.append(Request("mcqa_rag", "/v1/mcqa", {"question": q, "choices": c}))
        out.append(Request("mcqa", "/v1/mcqa", {"question": q, "choices": c, "use_rag": False}))
    out.append(Request("completion", "/v1/completions", {"prompt": "Photosynthesis makes", "max_tokens": 8,
                                                         "temperature": 0}))
    out.append(Request("echo", "/v1/completions", {"prompt": [[100, 200, 300, 400, 500], [7, 8, 9]], "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 1, "echo": True}))
    out.append(Request("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a noble gas."}],
                                                        "max_tokens": 8, "temperature": 0}))
    return out


def bad_requests() -> list[Request]:
    many_ids = [list(range(1, 2001)) for _ in range(9)]  # 18k prompt tokens: over the 16k default budget
    return [
        Request("bad:no question", "/v1/mcqa", {"choices": ["a", "b"]}),
        Request("bad:one choice", "/v1/mcqa", {"question": "q", "choices": ["only"]}),
        Request("bad:not json", "/v1/mcqa", raw=b'{"question": "q", "choices": ['),
        Request("bad:oversized body", "/v1/mcqa", raw=json.dumps({"question": "x" * 2_000_000,
                                                                  "choices": ["a", "b"]}).encode()),
        Request("bad:no api key", "/v1/mcqa", {"question": "q", "choices": ["a", "b"]}, auth=False),
        Request("bad:token id out of range", "/v1/completions", {"prompt": [1, 2, 10 ** 9]}),
        Request("bad:over the token budget", "/v1/completions", {"prompt": many_ids, "max_tokens": 1, "echo": True,
                                                                 "logprobs": 1}),
        Request("bad:max_tokens over the cap", "/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 6}),
        Request("bad:unknown role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}),
        Request("bad:too many messages", "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "hi"}] * 65}),
    ]


def mixed_requests(n: int, bad_share: float = 0.3) -> list[Request]:
    """n requests interleaved: about `bad_share` of them bad (each kind of bad in turn), the rest good."""
    good, bad = good_requests(), bad_requests()
    n_bad = round(n * bad_share)
    out = []
    for i in range(n):
        # spread the bad ones evenly through the list
        if (i + 1) * n_bad // n > i * n_bad // n:
            out.append(bad[(i * n_bad // n) % len(bad)])
        else:
            out.append(good[i % len(good)])
    return out


def _judge(req: Request, status: int, body) -> tuple[bool, str]:
    if req.bad:
        if not 400 <= status < 500:
            return False, f"expected a 4xx, got {status}"
        if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip()
                and isinstance(body.get("field"), str)):
            return False, f"a {status} without an error message naming the field: {str(body)[:200]}"
        return True, body["error"][:200]
    if status != 200:
        return False, f"{status}: {str(body)[:200]}"
    if req.path == "/v1/mcqa":
        good = isinstance(body, dict) and body.get("answer") in "ABCDEFGH"[:len(req.body["choices"])]
    else:
        good = isinstance(body, dict) and bool(body.get("choices"))
    return good, "" if good else f"200 without an answer: {str(body)[:200]}"


async def send(client: httpx.AsyncClient, url: str, req: Request, key: Optional[str]) -> Outcome:
    headers = {"Authorization": f"Bearer {key}"} if key and req.auth else {}
    started, t0 = time.time(), time.perf_counter()
    try:
        if req.raw is not None:
            r = await client.post(url + req.path, content=req.raw,
                                  headers={**headers, "Content-Type": "application/json"})
        else:
            r = await client.post(url + req.path, json=req.body, headers=headers)
    except httpx.HTTPError as e:
        return Outcome(req.kind, type(e).__name__, started, time.perf_counter() - t0, False, str(e)[:200])
    try:
        body = r.json()
    except ValueError:
        body = r.text
    ok, detail = _judge(req, r.status_code, body)
    return Outcome(req.kind, r.status_code, started, time.perf_counter() - t0, ok, detail)


async def send_all(url: str, requests: list[Request], key: Optional[str], timeout: float = 300) -> list[Outcome]:
    """Every request at once (one connection each), as many clients would."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return list(await asyncio.gather(*[send(client, url, r, key) for r in requests]))


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


@dataclass
class Summary:
    total: int
    good: int
    bad: int
    statuses: dict
    server_errors: int  # 5xx
    transport_errors: int  # no HTTP answer at all
    wrong: list  # outcomes not ok: (kind, status, detail)
    p50_s: Optional[float]
    p99_s: Optional[float]
    wall_s: float = 0.0
    bad_kinds: dict = field(default_factory=dict)  # each bad kind -> statuses it got


def summarize(outcomes: list[Outcome], wall_s: float = 0.0) -> Summary:
    statuses: dict = {}
    for o in outcomes:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    good_lat = sorted(o.latency_s for o in outcomes if not o.kind.startswith("bad:") and o.status == 200)
    bad_kinds: dict = {}
    for o in outcomes:
        if o.kind.startswith("bad:"):
            bad_kinds.setdefault(o.kind[4:], set()).add(o.status)
    return Summary(
        total=len(outcomes), good=sum(not o.kind.startswith("bad:") for o in outcomes),
        bad=sum(o.kind.startswith("bad:") for o in outcomes), statuses=dict(sorted(statuses.items())),
        server_errors=sum(isinstance(o.status, int) and o.status >= 500 for o in outcomes),
        transport_errors=sum(not isinstance(o.status, int) for o in outcomes),
        wrong=[(o.kind, o.status, o.detail) for o in outcomes if not o.ok],
        p50_s=percentile(good_lat, 50), p99_s=percentile(good_lat, 99), wall_s=wall_s,
        bad_kinds={k: sorted(map(str, v)) for k, v in sorted(bad_kinds.items())})


class Sustained:
    """`clients` threads, each sending good requests one after another until `stop()`: the load a fault drill
    runs under. Every outcome is kept with its start time."""

    def __init__(self, url: str, key: Optional[str], clients: int = 4, timeout: float = 180):
        self.url, self.key, self.timeout = url, key, timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        reqs = good_requests()

        async def loop():
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                j = i
                while not self._stop.is_set():
                    out = await send(client, self.url, reqs[j % len(reqs)], self.key)
                    with self._lock:
                        self.outcomes.append(out)
                    j += 1

        asyncio.run(loop())

    def __enter__(self) -> "Sustained":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 10)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def answered_since(self, t: float) -> int:
        """Good requests sent after time t that were answered."""
        return sum(1 for o in self.snapshot() if o.started >= t and o.ok)

    def wait_answers_since(self, t: float, n: int, timeout: float) -> Optional[float]:
        """Seconds from t until the n-th request sent after t was answered (its end), or None."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ends = sorted(o.started + o.latency_s for o in self.snapshot() if o.started >= t and o.ok)
            if len(ends) >= n:
                return ends[n - 1] - t
            time.sleep(0.25)
        return None
