"""Text generation and per-token log-probabilities for the OpenAI-compatible endpoints (run in the scorer).

Written here because the pieces we use lack them: transformers' `generate` gives generated tokens and their
scores but not the prompt's own log-probabilities (`echo` + `logprobs`), which lm-eval-harness's
`local-completions` model reads to score multiple-choice items: it sums `token_logprobs[ctxlen:-1]` and
checks each against `top_logprobs` for greediness. The prompt's log-probs come from one padded forward pass
(`MCQScorer._last_logprobs`, the same code `stemqa eval` scores with), so the served numbers equal the
evaluator's.
"""
from __future__ import annotations

import threading
from typing import Iterator, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string (excluded), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _logprob_entries(tok, ids: list[int], rows: torch.Tensor, top_n: int) -> dict:
    """OpenAI `logprobs` for tokens ids[1:] given rows[i] = log p(. | ids[:i+1]); the first token has none."""
    tokens = [tok.decode([t]) for t in ids]
    token_logprobs: list[Optional[float]] = [None]
    top: list[Optional[dict]] = [None]
    for i in range(1, len(ids)):
        row = rows[i - 1]
        token_logprobs.append(float(row[ids[i]]))
        if top_n:
            values, idx = row.topk(top_n)
            entry = {tok.decode([int(t)]): float(v) for v, t in zip(values, idx)}
            # the chosen token is always listed, as OpenAI does
            entry.setdefault(tokens[i], float(row[ids[i]]))
            top.append(entry)
        else:
            top.append({})
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class Generator:
    """Completions for one model: prompt log-probs (echo) and sampling/greedy generation."""

    def __init__(self, model, tokenizer, scorer):
        self.model, self.tok, self.scorer = model, tokenizer, scorer
        # what `generate` stops at: the generation config's eos ids (SmolLM2-Instruct: <|im_end|>, not the
        # tokenizer's eos token), else the tokenizer's
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.stop_ids = set(gen_eos) or {tokenizer.eos_token_id}

    def encode(self, prompt) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tok(prompt)["input_ids"]

    @torch.inference_mode()
    def prompt_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, [len, vocab] log-probs of the token after each position (row i: log p(. | ids[:i+1])),
        in one left-padded forward pass; the last row is the distribution of the first new token."""
        keep = max(len(p) for p in prompts)
        rows = self.scorer._last_logprobs(prompts, keep)
        return [row[keep - len(p):] for row, p in zip(rows, prompts)]

    def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                 seed: Optional[int]) -> tuple[list[int], torch.Tensor]:
        """New token ids and their [n, vocab] log-probs under the model (before sampling transforms)."""
        if seed is not None:
            torch.manual_seed(seed)
        return self.generate_many([ids], max_tokens, temperature, top_p, with_logprobs=True)[0]

    @torch.inference_mode()
    def generate_many(self, prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
                      with_logprobs: bool) -> list[tuple[list[int], Optional[torch.Tensor]]]:
        """`generate` for several prompts in one left-padded `model.generate` (greedy, or sampling from the
        global RNG: no per-request seed). Each row's new tokens end at its eos. Decoding reads every weight once
        per step whatever the batch, so on this CPU 16 prompts cost 3.39x less CPU per token than one at a time
        (benchmarks/bench_batching.py: SmolLM2-135M, 1 thread, same greedy tokens); log-probs only when asked:
        they cost [rows, steps, vocab]."""
        if max_tokens == 0:
            return [([], torch.empty(0)) for _ in prompts]
        width, pad = max(map(len, prompts)), self.scorer.pad_id
        dev = self.scorer.device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        sample = temperature > 0
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
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

    def choice(self, i: int, ids: list[int], new: list[int], new_rows, prompt_rows, max_tokens: int, stop,
               logprobs: Optional[int], echo: bool) -> dict:
        """One OpenAI completion choice from the prompt, its new tokens and their log-prob rows."""
        text, stopped = cut_at_stop(self.tok.decode(new, skip_special_tokens=True), _stop_list(stop))
        eos = bool(new) and new[-1] in self.stop_ids
        choice = {"index": i, "text": (self.tok.decode(ids) if echo else "") + text,
                  "finish_reason": "stop" if stopped or eos or max_tokens == 0 else "length", "logprobs": None}
        if logprobs is not None:
            rows = prompt_rows
            all_ids = (ids if echo else []) + new
            all_rows = torch.cat([rows, new_rows]) if echo and len(new_rows) else (rows if echo else new_rows)
            # rows line up with "log p(token i | before)": for echo, prompt token 0 has none
            entries = _logprob_entries(self.tok, ([ids[-1]] if not echo else []) + all_ids, all_rows, logprobs)
            if not echo:
                entries = {k: v[1:] for k, v in entries.items()}
            choice["logprobs"] = entries
        return choice

    def complete(self, prompts: list, max_tokens: int, temperature: float, top_p: float, stop, logprobs: Optional[int],
                 echo: bool, seed: Optional[int]) -> list[dict]:
        """OpenAI completion `choices` for each prompt (token ids or text), one prompt at a time."""
        encoded = [self.encode(p) for p in prompts]
        full = self.prompt_logprobs(encoded) if echo and logprobs is not None else [None] * len(encoded)
        choices = []
        for i, (ids, rows) in enumerate(zip(encoded, full)):
            if rows is not None and max_tokens == 1 and temperature == 0:
                # lm-eval's loglikelihood request (echo, logprobs, max_tokens=1, greedy): the one new token is
                # the argmax of the echo pass's last row, so no second forward pass over the whole prompt
                new, new_rows = [int(rows[-1].argmax())], rows[-1:]
            else:
                new, new_rows = self.generate(ids, max_tokens, temperature, top_p, seed)
            choices.append(self.choice(i, ids, new, new_rows, rows[:-1] if rows is not None else None, max_tokens,
                                       stop, logprobs, echo))
        return choices

    def stream(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, stop,
               seed: Optional[int]) -> Iterator[str]:
        """Text pieces as they are generated (transformers' TextIteratorStreamer on a thread)."""
        from transformers import TextIteratorStreamer

        if seed is not None:
            torch.manual_seed(seed)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        sample = temperature > 0
        kwargs = dict(input_ids=torch.tensor([ids], device=self.scorer.device),
                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.scorer.device),
                      max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else None,
                      top_p=top_p if sample else None, top_k=None, streamer=streamer, pad_token_id=self.scorer.pad_id)
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
