"""Text generation and per-token log-probabilities for the OpenAI-compatible endpoints (run in the scorer).

Written here because the pieces we use lack them: transformers' `generate` gives generated tokens and their
scores but not the prompt's own log-probabilities (`echo` + `logprobs`), which lm-eval-harness's
`local-completions` model reads to score multiple-choice items: it sums `token_logprobs[ctxlen:-1]` and
checks each against `top_logprobs` for greediness. The prompt's log-probs come from one forward pass per prompt
over the decoder, then the LM head `chunk_tokens` positions at a time, keeping only each position's chosen
token's log-prob and its top-n: the full-vocabulary log-probs of every position of every prompt at once
(64 prompts of 4,000 ids: 256k x vocab floats) took a replica down. They equal `stemqa eval`'s numbers
(tests/test_serve.py checks them against `MCQScorer.loglikelihoods`).

Sampling draws from a `torch.Generator` of each request's own (`Sampler`), never from torch's global RNG:
transformers' sampling uses the global one, which concurrent requests in other threads share, so a seeded
request gave other text whenever anything else sampled at the same time.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

Top = list[tuple[int, float]]  # (token id, log-prob), best first


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class TokenLogprobs:
    """Log-probs of a run of tokens: `chosen[i]` of token i given what came before (None: none, the first
    prompt token), and `top[i]` the top-n alternatives there."""

    chosen: list[Optional[float]]
    top: list[Optional[Top]]

    def __add__(self, other: "TokenLogprobs") -> "TokenLogprobs":
        return TokenLogprobs(self.chosen + other.chosen, self.top + other.top)


def summarize_rows(rows: torch.Tensor, ids: Sequence[int], top_n: int) -> TokenLogprobs:
    """[n, vocab] log-prob rows -> the log-prob of ids[i] in row i and row i's top_n."""
    rows = rows.float()
    chosen = rows[torch.arange(len(ids)), torch.tensor(list(ids), dtype=torch.long)].tolist() if len(ids) else []
    top: list[Optional[Top]] = []
    if top_n:
        values, idx = rows.topk(top_n, dim=-1)
        top = [list(zip(i.tolist(), v.tolist())) for v, i in zip(values, idx)]
    else:
        top = [[] for _ in ids]
    return TokenLogprobs(chosen, top)


def _logprob_entries(tok, ids: list[int], lp: TokenLogprobs, offset: int = 0) -> dict:
    """OpenAI `logprobs` for tokens `ids` with their log-probs `lp` (same length); `text_offset` counts from
    `offset` (the prompt's length when it is not echoed)."""
    tokens = [tok.decode([t]) for t in ids]
    top: list[Optional[dict]] = []
    for token, chosen, alts in zip(tokens, lp.chosen, lp.top):
        if chosen is None:
            top.append(None)
            continue
        entry = {tok.decode([t]): v for t, v in alts}
        if alts:
            entry.setdefault(token, chosen)  # the chosen token is always listed, as OpenAI does
        top.append(entry)
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": list(lp.chosen), "top_logprobs": top, "text_offset": offsets}


class Sampler(LogitsProcessor):
    """Draws each next token with this request's own `torch.Generator` (temperature, then top-p, as
    transformers' warpers do) and leaves only that token possible, so `generate` run greedily emits it.
    transformers' own sampling draws from the global RNG, shared by every request thread of the replica."""

    def __init__(self, temperature: float, top_p: float, seed: Optional[int], device="cpu"):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device)
        # unseeded: a fresh seed from the OS (torch.seed() would reseed the global RNG)
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token once the more likely ones already hold top_p (the most likely always stays)
            drop = probs.cumsum(-1) - probs >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        pick = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter(-1, pick, 0.0)


class Generator:
    """Completions for one model: prompt log-probs (echo) and sampling/greedy generation."""

    def __init__(self, model, tokenizer, scorer, chunk_tokens: int = 512):
        self.model, self.tok, self.scorer, self.chunk_tokens = model, tokenizer, scorer, chunk_tokens
        # what `generate` stops at: the generation config's eos ids (SmolLM2-Instruct: <|im_end|>, not the
        # tokenizer's eos token), else the tokenizer's
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.stop_ids = set(gen_eos) or {tokenizer.eos_token_id}

    def encode(self, prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tok(prompt)["input_ids"]

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top_n: int) -> tuple[TokenLogprobs, TokenLogprobs]:
        """The prompt's own log-probs (token 0 has none) and those of the next token after it (one row: the
        argmax first when top_n is 0, so a greedy next token can be read off it).

        One forward pass over the decoder, then the LM head over `chunk_tokens` positions at a time: at most
        chunk_tokens x vocab log-probs exist at once, whatever the prompt's length. One prompt per pass: no
        padding, so attention runs causal without a mask (less memory than a padded batch's)."""
        base, head = self.model.base_model, self.model.get_output_embeddings()
        x = torch.tensor([ids], device=self.scorer.device)
        hidden = base(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).last_hidden_state[0]
        cap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma-2 style models cap logits
        chosen: list[Optional[float]] = [None]
        top: list[Optional[Top]] = [None]
        nxt = TokenLogprobs([], [])
        for start in range(0, len(ids), self.chunk_tokens):
            end = min(start + self.chunk_tokens, len(ids))
            logits = head(hidden[start:end]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            rows = torch.log_softmax(logits, dim=-1)
            targets = ids[start + 1:end + 1]  # row i predicts token i + 1; the prompt's last row predicts the next
            part = summarize_rows(rows[:len(targets)], targets, top_n)
            chosen += part.chosen
            top += part.top
            if end == len(ids):
                last = rows[-1]
                best = int(last.argmax())
                nxt = summarize_rows(last[None], [best], max(top_n, 1))
        return TokenLogprobs(chosen, top), nxt

    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 seed: Optional[int]) -> tuple[list[int], torch.Tensor]:
        """New token ids and their [n, vocab] log-probs under the model (before sampling transforms)."""
        return self.generate_many([ids], max_tokens, temperature, top_p, with_logprobs=True, seed=seed)[0]

    @torch.inference_mode()
    def generate_many(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
                      with_logprobs: bool, seed: Optional[int] = None) -> list[tuple[list[int], Optional[torch.Tensor]]]:
        """`generate` for several prompts in one left-padded `model.generate` (greedy, or sampling with a
        `Sampler` of this call's own: seeded, or from a fresh seed). Each row's new tokens end at its eos. Decoding reads every weight once
        per step whatever the batch, so on this CPU 16 prompts cost 3.39x less CPU per token than one at a time
        (benchmarks/bench_batching.py: SmolLM2-135M, 1 thread, same greedy tokens); log-probs only when asked:
        they cost [rows, steps, vocab]."""
        if max_tokens == 0:
            return [([], torch.empty(0)) for _ in prompts]
        width, pad = max(map(len, prompts)), self.scorer.pad_id
        dev = self.scorer.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, **self._decoding(temperature, top_p, seed),
            output_logits=with_logprobs, return_dict_in_generate=True, pad_token_id=pad)
        results = []
        for r in range(len(prompts)):
            new = out.sequences[r, width:].tolist()
            end = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
            if end is not None:  # finished rows are filled with padding after their eos
                new = new[:end + 1]
            rows = None
            if with_logprobs:
                rows = torch.log_softmax(torch.stack([step[r] for step in out.logits[:len(new)]]).float(), -1).cpu()
            results.append((new, rows))
        return results

    def _decoding(self, temperature: float, top_p: float, seed: Optional[int]) -> dict:
        """`generate` arguments: greedy, with a `Sampler` doing the sampling when temperature > 0."""
        procs = [Sampler(temperature, top_p, seed, self.scorer.device)] if temperature > 0 else []
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                    logits_processor=LogitsProcessorList(procs))

    def choice(self, i: int, ids: list[int], new: list[int], new_lp: Optional[TokenLogprobs],
               prompt_lp: Optional[TokenLogprobs], max_tokens: int, stop, logprobs: Optional[int], echo: bool) -> dict:
        """One OpenAI completion choice from the prompt, its new tokens and their log-probs."""
        text, stopped = cut_at_stop(self.tok.decode(new, skip_special_tokens=True), _stop_list(stop))
        eos = bool(new) and new[-1] in self.stop_ids
        choice = {"index": i, "text": (self.tok.decode(ids) if echo else "") + text,
                  "finish_reason": "stop" if stopped or eos or max_tokens == 0 else "length", "logprobs": None}
        if logprobs is not None:
            new_lp = new_lp or TokenLogprobs([], [])
            if echo:
                choice["logprobs"] = _logprob_entries(self.tok, ids + new, prompt_lp + new_lp)
            else:
                choice["logprobs"] = _logprob_entries(self.tok, new, new_lp, len(self.tok.decode(ids)))
        return choice

    def complete(self, prompts: list, max_tokens: int, temperature: float, top_p: float, stop, logprobs: Optional[int],
                 echo: bool, seed: Optional[int]) -> list[dict]:
        """OpenAI completion `choices` for each prompt (token ids or text), one prompt at a time."""
        top_n = logprobs or 0
        choices = []
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            prompt_lp = nxt = None
            if echo and logprobs is not None:
                prompt_lp, nxt = self.prompt_logprobs(ids, top_n)
            if nxt is not None and max_tokens == 1 and temperature == 0:
                # lm-eval's loglikelihood request (echo, logprobs, max_tokens=1, greedy): the one new token is
                # the argmax of the echo pass's last row, so no second forward pass over the whole prompt
                new = [nxt.top[0][0][0]]
                new_lp = TokenLogprobs(nxt.chosen, [nxt.top[0][:top_n]])
            else:
                new, rows = self.generate(ids, max_tokens, temperature, top_p, seed)
                new_lp = summarize_rows(rows, new, top_n) if logprobs is not None else None
            choices.append(self.choice(i, ids, new, new_lp, prompt_lp, max_tokens, stop, logprobs, echo))
        return choices

    def stream(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop,
               seed: Optional[int]) -> Iterator[str]:
        """Text pieces as they are generated (transformers' TextIteratorStreamer on a thread)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=torch.tensor([ids], device=self.scorer.device),
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.scorer.device),
                      max_new_tokens=max_tokens, **self._decoding(temperature, top_p, seed), streamer=streamer,
                      pad_token_id=self.scorer.pad_id)
        cancel = threading.Event()  # set on a stop string or a client that went away: generate stops early
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled(cancel)])
        thread = threading.Thread(target=lambda: torch.inference_mode()(self.model.generate)(**kwargs), daemon=True)
        thread.start()
        stops, sent = _stop_list(stop), ""
        try:
            for piece in streamer:
                text, stopped = cut_at_stop(sent + piece, stops)
                if len(text) > len(sent):
                    yield text[len(sent):]
                    sent = text
                if stopped:
                    break
        finally:
            cancel.set()
            thread.join(timeout=30)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
