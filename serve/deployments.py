"""The two model-holding Serve deployments: the scorer/generator (the LM) and the retriever (embedder + FAISS).

Both batch concurrent calls with `@serve.batch`: the scorer takes up to `serve.max_batch_size` questions at
once and scores those of one answer mode together, in as few scoring calls as keeps left-padding under 10%
(`length_groups`); every mode is `MCQScorer.score`, the scorer `stemqa eval` runs. It takes as many
unseeded generation requests (/v1/completions without echo, non-streamed chat) into one `generate`; the
retriever embeds up to as many queries at once. The batch sizes are set from the config when a replica
starts. `stats()` tells a benchmark or test the replica's pid, torch threads and batch sizes seen.
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Optional

from ray import serve

from serve.schemas import ApiError, check_token_budget, check_token_ids, prompt_field


# Most padding a scoring forward pass may carry, as a share of its real tokens. Measured in-process (SmolLM2-135M,
# 1 CPU thread, 32 grade-8 science questions of 46-136 tokens): one left-padded forward over 16 mixed-length
# questions cost 1.57x the CPU seconds of scoring them one at a time (40% more tokens from padding, plus
# the cost of masking them); the same 16 split into length groups with <= 10% padding cost 0.91x.
MAX_PAD_WASTE = 0.10


def length_groups(lengths: list[int], max_waste: float = MAX_PAD_WASTE) -> list[list[int]]:
    """Indices grouped longest first so that each group, left-padded to its longest, has at most `max_waste`
    padding tokens per real token; each group is one forward pass."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= (1 + max_waste) * (total + lengths[i]):
            groups[-1].append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


async def _replica_stats(batch_sizes: Counter) -> dict:
    import resource

    import torch

    # read in a worker thread: that is where the batches run (torch's thread setting is per process, and
    # this shows it holds there too)
    threads = await asyncio.to_thread(torch.get_num_threads)
    return {"pid": os.getpid(), "torch_threads": threads, "batch_sizes": dict(sorted(batch_sizes.items())),
            "batches": sum(batch_sizes.values()), "items": sum(k * v for k, v in batch_sizes.items()),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


@serve.deployment(name="Scorer")
class Scorer:
    def __init__(self, model: str, max_batch_size: int, batch_wait_timeout_s: float, threads: int,
                 passage_token_budget: int, header: bool = True, dtype: str = "auto",
                 trust_remote_code: bool = False, gen_batch_wait_timeout_s: float = 0.2,
                 max_request_tokens: int = 16_384, echo_chunk_tokens: int = 512, mode_params: Optional[dict] = None):
        import torch

        from stemqa.eval.modes import ModeParams
        from stemqa.eval.scorer import MCQScorer
        from stemqa.models import load_causal_lm, load_tokenizer

        from serve.generation import Generator

        # One thread per reserved CPU: more threads than CPUs on a shared machine ran 2-3x slower (notes).
        torch.set_num_threads(max(1, threads))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tok = load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code)
        self.scorer = MCQScorer(self.model, self.tok, batch_size=max_batch_size)
        self.generator = Generator(self.model, self.tok, self.scorer, echo_chunk_tokens)
        self.header, self.passage_token_budget = header, passage_token_budget
        self.max_request_tokens = max_request_tokens
        # the served answer mode (serve.mode_params, read where the app was built); a request may name another
        self.mode_params = ModeParams.model_validate(mode_params or {})
        # Echo scoring and seeded sampling run outside the batches, one request at a time per replica: each is
        # bounded by the token budget, and two at once would only split the same CPUs and double the memory.
        self._alone = asyncio.Semaphore(1)
        self._score_batch.set_max_batch_size(max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(gen_batch_wait_timeout_s)
        # for stats() (benchmarks, tests): requests per @serve.batch call; scoring calls, one per (mode, length
        # group): a letter-mode call is one forward pass (up to max_batch_size questions), cloze and permute more
        self.batch_sizes: Counter = Counter()
        self.forward_passes = 0
        self.mode_calls: Counter = Counter()  # scoring calls per answer mode
        self.mode_items: Counter = Counter()  # questions scored per answer mode
        self.gen_batch_sizes: Counter = Counter()  # generation requests per @serve.batch call
        self.generate_calls = 0  # model.generate calls they took

    def info(self) -> dict:
        return {"max_length": self.scorer.max_length, "vocab_size": len(self.tok)}

    async def stats(self) -> dict:
        """This replica's process id, torch threads (as the scoring thread sees them), batch sizes so far."""
        gen = self.gen_batch_sizes
        return dict(await _replica_stats(self.batch_sizes), forward_passes=self.forward_passes,
                    mode_calls=dict(self.mode_calls), mode_items=dict(self.mode_items),
                    gen_batch_sizes=dict(sorted(gen.items())), gen_items=sum(k * v for k, v in gen.items()),
                    generate_calls=self.generate_calls)

    def check_health(self) -> None:
        # Serve calls this every health_check_period_s; a replica whose model is gone is replaced.
        if self.model is None:
            raise RuntimeError("model not loaded")

    async def mcqa(self, question: str, choices: list[str], subject: str, passages: list[dict],
                   mode_params: Optional[dict] = None) -> dict:
        """One question answered in an answer mode (`mode_params`, a ModeParams dict; default: the served one);
        concurrent calls of the same mode are scored in one batch.

        `passages` (retrieved, best first) are cut to rag.token_budget model tokens exactly as the
        evaluator does (`passages_within_budget`); the ones used come back under "passages", the prompt scored
        (permute: unrotated) under "prompt", the input tokens its forward passes read under "tokens".
        """
        from stemqa.data.mcq import MCQ
        from stemqa.eval.modes import ModeParams
        from stemqa.rag import Passage, passages_within_budget

        params = self.mode_params if mode_params is None else ModeParams.model_validate(mode_params)
        record = MCQ(id="request", subject=subject, question=question, choices=list(choices), answer=0, source="api")
        used = passages_within_budget([Passage(**p) for p in passages], self.tok, self.passage_token_budget)
        texts = [p.text for p in used]
        # Checked here, before batching, so one over-long or over-budget request fails alone, not its whole batch.
        cost = self.scorer.cost(record, params, header=self.header, passages=texts)
        if cost.longest > self.scorer.max_length:
            raise ApiError(413, "question", f"the prompt and the answer scored after it are {cost.longest} tokens "
                           f"in scoring {params.label()}, over the model's context of {self.scorer.max_length}")
        if cost.tokens > self.max_request_tokens:
            # permute's passes are what multiply the cost; a letter or cloze request over it is its text
            raise ApiError(413, "scoring" if params.mode == "permute" else "question",
                           f"scoring {params.label()} reads {cost.tokens} tokens for this question, over this "
                           f"server's serve.max_request_tokens of {self.max_request_tokens}")
        pred = await self._score_batch((record, texts, cost.longest, params))
        return {"answer": pred.pred, "probabilities": pred.probabilities, "loglikelihoods": pred.loglikelihoods,
                "scores": pred.scores, "unsure": pred.unsure, "mode": pred.mode,
                "passages": [p.to_dict() for p in used], "prompt": cost.prompt, "tokens": cost.tokens}

    # --- OpenAI-compatible generation -------------------------------------------------------------------
    def _check_prompt(self, field: str, ids: list[int], max_tokens: int) -> int:
        """The prompt fits the context; returns max_tokens capped to the room left after it."""
        check_token_ids(field, ids, len(self.tok), self.scorer.max_length)
        return min(max_tokens, self.scorer.max_length - len(ids))

    async def completions(self, prompts: list, max_tokens: int, temperature: float, top_p: float, stop,
                          logprobs, echo: bool, seed, n: int = 1) -> dict:
        from serve.generation import summarize_rows

        encoded = [self.generator.encode(p) for p in prompts]
        caps = [self._check_prompt(prompt_field(i, len(prompts)), ids, max_tokens) for i, ids in enumerate(encoded)]
        # before any compute: the budget bounds what one request can make this replica hold and do
        check_token_budget("prompt", [len(ids) for ids in encoded], max_tokens, n, self.max_request_tokens)
        cap = min(caps)
        if echo or seed is not None:
            # echo (lm-eval's scoring requests: one forward over each prompt) and seeded sampling (its own
            # generator) run one prompt at a time
            async with self._alone:
                choices = await asyncio.to_thread(self.generator.complete, encoded, cap, temperature, top_p, stop,
                                                  logprobs, echo, seed)
        else:
            outs = await asyncio.gather(*[self._generate_batch((ids, cap, temperature, top_p, logprobs is not None))
                                          for ids in encoded])
            choices = [self.generator.choice(i, ids, new, summarize_rows(rows, new, logprobs or 0)
                                             if logprobs is not None else None, None, cap, stop, logprobs, False)
                       for i, (ids, (new, rows)) in enumerate(zip(encoded, outs))]
        completion = sum(len(self.tok(c["text"])["input_ids"]) for c in choices) if not echo else None
        return {"choices": choices, "usage": {"prompt_tokens": sum(map(len, encoded)),
                                              "completion_tokens": completion}}

    def chat_prompt(self, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """Token ids of the chat template applied to `messages`, and the max_tokens that fit after them."""
        if not getattr(self.tok, "chat_template", None):
            raise ApiError(422, "messages", "this model has no chat template; use /v1/completions")
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the roles/order it was given
            raise ApiError(422, "messages", f"the chat template rejected them: {e}") from None
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        cap = self._check_prompt("messages", ids, max_tokens)
        check_token_budget("messages", [len(ids)], max_tokens, 1, self.max_request_tokens)
        return ids, cap

    async def chat(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop, seed) -> dict:
        if seed is not None:
            async with self._alone:
                choice = (await asyncio.to_thread(self.generator.complete, [ids], max_tokens, temperature, top_p,
                                                  stop, None, False, seed))[0]
        else:
            new, _ = await self._generate_batch((ids, max_tokens, temperature, top_p, False))
            choice = self.generator.choice(0, ids, new, None, None, max_tokens, stop, None, False)
        return {"text": choice["text"], "finish_reason": choice["finish_reason"],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(self.tok(choice["text"])["input_ids"])}}

    def chat_stream(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop, seed):
        yield from self.generator.stream(ids, max_tokens, temperature, top_p, stop, seed)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[tuple]) -> list:
        self.batch_sizes[len(items)] += 1
        # In a thread, so requests keep arriving (and queue for the next batch) while this one computes.
        return await asyncio.to_thread(self._score_grouped, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, items: list[tuple]) -> list:
        """(ids, max_tokens, temperature, top_p, with_logprobs) -> (new ids, log-prob rows or None)."""
        self.gen_batch_sizes[len(items)] += 1
        return await asyncio.to_thread(self._generate_grouped, items)

    def _generate_grouped(self, items: list[tuple]) -> list:
        """One `generate` per (max_tokens, temperature, top_p): a batch of static shape, so no request waits on
        more tokens than it asked for (rows that reach eos early still wait for their group)."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (_, cap, temperature, top_p, _) in enumerate(items):
            groups.setdefault((cap, temperature, top_p), []).append(i)
        for (cap, temperature, top_p), members in groups.items():
            self.generate_calls += 1
            res = self.generator.generate_many([items[i][0] for i in members], cap, temperature, top_p,
                                               any(items[i][4] for i in members))
            for i, r in zip(members, res):
                out[i] = r
        return out

    def _score_grouped(self, items: list[tuple]) -> list:
        """Score (record, passages, longest sequence, ModeParams) items: per answer mode, one scoring call per
        group of similar lengths (the scorer itself runs a mode's passes: `MCQScorer.score`)."""
        preds: list = [None] * len(items)
        modes: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            modes.setdefault(item[3].model_dump_json(), []).append(i)
        for members in modes.values():
            params = items[members[0]][3]
            for group in length_groups([items[i][2] for i in members]):
                idx = [members[j] for j in group]
                self.forward_passes += 1
                self.mode_calls[params.label()] += 1
                self.mode_items[params.label()] += len(idx)
                out = self.scorer.score([items[i][0] for i in idx], params, (), self.header,
                                        [items[i][1] for i in idx])
                for i, pred in zip(idx, out):
                    preds[i] = pred
        return preds


@serve.deployment(name="Retriever")
class Retriever:
    def __init__(self, index_dir: str, max_batch_size: int, batch_wait_timeout_s: float, threads: int):
        import torch

        from stemqa.rag import Retriever as IndexRetriever

        torch.set_num_threads(max(1, threads))
        self.retriever = IndexRetriever.load(index_dir)
        self._search_batch.set_max_batch_size(max_batch_size)
        self._search_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()

    async def stats(self) -> dict:
        return await _replica_stats(self.batch_sizes)

    async def search(self, query: str, k: int) -> list[dict]:
        return await self._search_batch((query, k))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _search_batch(self, items: list[tuple[str, int]]) -> list[list[dict]]:
        k_max = max(k for _, k in items)
        self.batch_sizes[len(items)] += 1
        hits = await asyncio.to_thread(self.retriever.search, [q for q, _ in items], k_max)
        return [[p.to_dict() for p in found[:k]] for (_, k), found in zip(items, hits)]


def scorer_options(cfg) -> dict:
    """Deployment options of the scorer from ServeConfig: autoscaling, CPUs, health checks, quiet logs."""
    s = cfg.serve
    a = s.autoscaling
    return dict(
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "initial_replicas": max(1, a.min_replicas),
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
        max_ongoing_requests=max(s.max_ongoing_requests, s.max_batch_size),
        ray_actor_options={"num_cpus": s.cpus_per_replica},
        health_check_period_s=s.health_check_period_s, health_check_timeout_s=s.health_check_timeout_s,
        logging_config=quiet_logging(),
    )


def quiet_logging() -> dict:
    return {"enable_access_log": False, "log_level": "WARNING"}


def threads_for(cpus: float) -> int:
    return max(1, int(cpus))


def retriever_options(cfg) -> dict:
    s = cfg.serve
    return dict(num_replicas=1, max_ongoing_requests=max(s.max_ongoing_requests, s.max_batch_size),
                ray_actor_options={"num_cpus": s.retriever_cpus},
                health_check_period_s=s.health_check_period_s, health_check_timeout_s=s.health_check_timeout_s,
                logging_config=quiet_logging())

