"""The one MCQ scorer: serves `stemqa eval` and the served `/v1/mcqa` alike.

Letter scoring compares log p(" A" | prompt), log p(" B" | prompt), ... after the harness prompt's `Answer:`,
tokenised exactly as lm-eval-harness does (`_encode_pair`: context + continuation encoded whole and split; the
tokenizer's own special-token default), so predictions agree with lm-eval's `multiple_choice` tasks.

Why not call lm-eval itself: it scores each (context, letter) as a separate request and materialises
full-vocabulary logits for every position. Here one forward pass per question returns logits for the last
position only (`logits_to_keep`), batches are length-sorted and left-padded, and the letters are read off
that one row. Cloze scoring (each answer text as the continuation, acc_norm by character length) keeps the
logits of the last `max continuation + 1` positions only.

Shared-prefix caching (lm-eval has none): the questions of one call usually share a long token prefix (the
subject header and, k-shot, the same dev examples: ~85% of a 5-shot MMLU prompt). That prefix is run once;
its KV cache is copied to every row of a batch and only the rest of each prompt is run. The prefix is taken
on the token ids of the whole prompts (the longest common prefix), so the tokenisation is exactly lm-eval's
and a causal model computes the same values (up to float rounding) as a full pass.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

# A common prefix shorter than this is not worth a separate forward pass and a cache copy per batch.
MIN_PREFIX = 16

import torch

from stemqa.data.mcq import LETTERS, MCQ
from stemqa.data.prompt import harness_prompt, passages_block, subject_header
from stemqa.eval.modes import (ModeParams, as_params, cloze_scores, cyclic_shifts, debias, log_softmax,
                               permuted_option_logprobs, rotate, softmax)


@dataclass
class Prediction:
    id: str
    subject: str
    gold: str
    pred: str
    loglikelihoods: list[float]  # per option, in the question's order: letter or answer-text log-likelihoods
    probabilities: list[float]  # softmax(scores / temperature): the top one is `pred`'s
    mode: str = "letter"  # ModeParams.label() of the mode that scored it
    scores: Optional[list[float]] = None  # what the mode decides by (acc_norm, debiased, permutation-averaged)
    unsure: Optional[bool] = None  # top probability under the fitted threshold; None when no threshold is set

    def to_dict(self) -> dict:
        return dict(id=self.id, subject=self.subject, gold=self.gold, pred=self.pred,
                    loglikelihoods=self.loglikelihoods, probabilities=self.probabilities, mode=self.mode,
                    scores=self.scores, unsure=self.unsure)

    @classmethod
    def from_dict(cls, d: dict) -> "Prediction":
        return cls(**{k: d[k] for k in ("id", "subject", "gold", "pred", "loglikelihoods", "probabilities")},
                   mode=d.get("mode", "letter"), scores=d.get("scores"), unsure=d.get("unsure"))


class MCQScorer:
    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: Optional[int] = None,
                 prefix_cache: bool = True):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        cfg_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = max_length or min(cfg_len, 4096)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.prefix_cache = prefix_cache
        self._prefix: Optional[tuple[tuple[int, ...], object]] = None  # (prefix ids, its KV cache), last one only

    # --- tokenisation, as lm-eval's _encode_pair ---------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok(context + continuation)["input_ids"]
        ctx = self.tok(context)["input_ids"]
        return ctx, whole[len(ctx):]

    # --- the forward pass ---------------------------------------------------------------------------------
    def shared_prefix(self, seqs: Sequence[Sequence[int]], keep: int) -> int:
        """Length of the token prefix all `seqs` share, leaving at least `keep` tokens of each to run; 0 if short."""
        if not self.prefix_cache or len(seqs) < 2:
            return 0
        first, n = seqs[0], min(len(s) for s in seqs) - keep
        for s in seqs[1:]:
            n = min(n, next((i for i, (a, b) in enumerate(zip(first[:n], s[:n])) if a != b), n))
        return n if n >= MIN_PREFIX else 0

    def _prefix_kv(self, prefix: tuple[int, ...]):
        if self._prefix is None or self._prefix[0] != prefix:
            ids = torch.tensor([list(prefix)], device=self.device)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._prefix = (prefix, out.past_key_values)
        return self._prefix[1]

    @torch.inference_mode()
    def _last_logprobs(self, seqs: list[list[int]], keep: int, prefix_len: int = 0) -> list[torch.Tensor]:
        """Log-softmax of the last `keep` positions of each sequence ([keep, vocab] each), batched.
        With `prefix_len`, the first `prefix_len` tokens (the same in every sequence) come from the KV cache."""
        past = None
        if prefix_len:
            past = copy.deepcopy(self._prefix_kv(tuple(seqs[0][:prefix_len])))
            past.batch_repeat_interleave(len(seqs))
            seqs = [s[prefix_len:] for s in seqs]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding (after the cached prefix): every sequence ends at the last column
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
        if prefix_len:
            mask = torch.cat([torch.ones((len(seqs), prefix_len), dtype=torch.long), mask], dim=1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), logits_to_keep=keep, past_key_values=past,
                         use_cache=past is not None)
        return list(torch.log_softmax(out.logits.float(), dim=-1).cpu())

    def _truncate(self, ctx: list[int], cont: list[int]) -> list[int]:
        # as lm-eval: keep the last max_length tokens of context+continuation (minus the final token)
        return (ctx + cont)[-(self.max_length + 1):][:-1]

    def loglikelihoods(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation | context) for each (context, continuation), lm-eval style."""
        enc = [self.encode_pair(c, x) for c, x in requests]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]) - len(enc[i][1]))
        results = [0.0] * len(enc)
        truncated = [self._truncate(*e) for e in enc]
        prefix_len = self.shared_prefix(truncated, keep=max((len(c) for _, c in enc), default=1))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs = [truncated[i] for i in idx]
            keep = max(len(enc[i][1]) for i in idx)
            rows = self._last_logprobs(seqs, keep, prefix_len)
            for i, row in zip(idx, rows):
                cont = enc[i][1]
                lp = row[keep - len(cont):]
                results[i] = float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())
        return results

    def letter_loglikelihoods(self, prompts: list[str], n_choices: list[int]) -> list[list[float]]:
        """Per prompt, log p(' A'), log p(' B'), ...; one forward pass per prompt when letters are one token."""
        results: list[Optional[list[float]]] = [None] * len(prompts)
        single, multi = [], []
        for i, (p, n) in enumerate(zip(prompts, n_choices)):
            pairs = [self.encode_pair(p, f" {LETTERS[j]}") for j in range(n)]
            ctx = pairs[0][0]
            if all(len(c) == 1 and x == ctx for x, c in pairs):
                single.append((i, ctx, [c[0] for _, c in pairs]))
            else:  # a tokenizer that splits ' A' or merges it into the context: score each letter separately
                multi.append(i)
        single.sort(key=lambda t: -len(t[1]))
        prefix_len = self.shared_prefix([self._truncate(ctx, [0]) for _, ctx, _ in single], keep=1)
        for start in range(0, len(single), self.batch_size):
            chunk = single[start:start + self.batch_size]
            rows = self._last_logprobs([self._truncate(ctx, [0]) for _, ctx, _ in chunk], keep=1, prefix_len=prefix_len)
            for (i, _, letter_ids), row in zip(chunk, rows):
                results[i] = [float(row[0, t]) for t in letter_ids]
        for i in multi:
            results[i] = self.loglikelihoods([(prompts[i], f" {LETTERS[j]}") for j in range(n_choices[i])])
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def choice_loglikelihoods(self, contexts: list[str], options: list[list[str]]) -> list[list[float]]:
        """Per context, log p(option | context) of each of its options (lm-eval's `_encode_pair` tokens).

        Why not `loglikelihoods` on every (context, option): a question's options share its context, so the
        context runs once (its KV cache is repeated for the options) and only the option tokens run again:
        for ARC, ~3x fewer tokens than one full pass per option. Same values up to float rounding."""
        enc = [[self.encode_pair(c, o) for o in opts] for c, opts in zip(contexts, options)]
        results: list[Optional[list[float]]] = [None] * len(contexts)
        fits = []
        for i, pairs in enumerate(enc):
            ctx = pairs[0][0]
            same_ctx = all(c == ctx for c, _ in pairs) and len(ctx) > 0
            longest = max(len(x) for _, x in pairs)
            if same_ctx and len(ctx) + longest <= self.max_length:
                fits.append(i)
            else:  # a context the tokenizer merges into an option, or too long: one full pass per option
                results[i] = self.loglikelihoods([(contexts[i], o) for o in options[i]])
        fits.sort(key=lambda i: -len(enc[i][0][0]))
        # k-shot contexts share a long prefix: run it once for the call (as letter scoring does)
        prefix_len = self.shared_prefix([enc[i][0][0] for i in fits], keep=1)
        for start in range(0, len(fits), self.batch_size):
            idx = fits[start:start + self.batch_size]
            for i, row in zip(idx, self._options_after_contexts([enc[i][0][0] for i in idx],
                                                                [[x for _, x in enc[i]] for i in idx], prefix_len)):
                results[i] = row
        return results  # type: ignore[return-value]

    def _options_after_contexts(self, ctxs: list[list[int]], conts: list[list[list[int]]],
                                prefix_len: int = 0) -> list[list[float]]:
        past = None
        if prefix_len:
            past = copy.deepcopy(self._prefix_kv(tuple(ctxs[0][:prefix_len])))
            past.batch_repeat_interleave(len(ctxs))
        width = max(len(c) for c in ctxs) - prefix_len
        ids = torch.full((len(ctxs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ctxs), width), dtype=torch.long)
        for i, c in enumerate(ctxs):  # left padding after the cached prefix: every context ends at the last column
            ids[i, width - len(c) + prefix_len:] = torch.tensor(c[prefix_len:])
            mask[i, width - len(c) + prefix_len:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0) + prefix_len
        mask = torch.cat([torch.ones((len(ctxs), prefix_len), dtype=torch.long), mask], dim=1)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), past_key_values=past, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # predicts each option's first token
        rows = [(i, x) for i, opts in enumerate(conts) for x in opts]
        tail = max(len(x) for _, x in rows) - 1  # option tokens after the first, run on the repeated cache
        later = None
        if tail > 0:
            past = out.past_key_values
            past.batch_select_indices(torch.tensor([i for i, _ in rows], device=self.device))
            t_ids = torch.full((len(rows), tail), self.pad_id, dtype=torch.long)
            t_mask = torch.zeros((len(rows), tail), dtype=torch.long)
            for r, (_, x) in enumerate(rows):  # right padding after the context's last column
                t_ids[r, :len(x) - 1] = torch.tensor(x[:-1], dtype=torch.long)
                t_mask[r, :len(x) - 1] = 1
            ctx_len = torch.tensor([len(ctxs[i]) for i, _ in rows])
            t_pos = ctx_len[:, None] + torch.arange(tail)[None, :]
            full_mask = torch.cat([mask[[i for i, _ in rows]], t_mask], dim=1)
            later = torch.log_softmax(self.model(
                input_ids=t_ids.to(self.device), attention_mask=full_mask.to(self.device),
                position_ids=t_pos.to(self.device), past_key_values=past, use_cache=True).logits.float(), dim=-1).cpu()
        values: list[list[float]] = [[] for _ in ctxs]
        for r, (i, x) in enumerate(rows):
            v = float(first[i, x[0]])
            if len(x) > 1:
                v += float(later[r, torch.arange(len(x) - 1), torch.tensor(x[1:])].sum())
            values[i].append(v)
        return values

    # --- MCQs -------------------------------------------------------------------------------------------
    def score(self, records: Sequence[MCQ], scoring: Union[str, ModeParams] = "letter", fewshot: Sequence[MCQ] = (),
              header: bool = True, passages: Optional[Sequence[Sequence[str]]] = None) -> list[Prediction]:
        """Predict every record in the answer mode `scoring` (a mode name or fitted `ModeParams`, see
        stemqa.eval.modes); `passages[i]` (retrieved texts) go before question i when given."""
        params = as_params(scoring)
        ctx = [dict(fewshot=fewshot, header=header, passages=passages[i] if passages else None)
               for i in range(len(records))]
        if params.mode == "cloze":
            prompts = [cloze_prompt(q, template=params.cloze_template, **c) for q, c in zip(records, ctx)]
            lls = self.choice_loglikelihoods(prompts, [[f" {o}" for o in q.choices] for q in records])
            scores = [cloze_scores(row, q.choices, params.cloze_norm) for row, q in zip(lls, records)]
        elif params.mode == "permute":
            lls, scores = self.permuted(records, ctx, params.permute_k)
        else:
            prompts = [harness_prompt(q, **c) for q, c in zip(records, ctx)]
            lls = self.letter_loglikelihoods(prompts, [len(q.choices) for q in records])
            scores = lls
            if params.mode == "letter_debiased":
                scores = [debias(log_softmax(row), params.letter_prior.get(len(row))) for row in lls]
        return [predict(q.id, q.subject, q.answer_letter, ll, d, params) for q, ll, d in zip(records, lls, scores)]

    def position_logprobs(self, records: Sequence[MCQ], ctx: Sequence[dict], k: Optional[int] = None
                          ) -> list[tuple[list[int], list[list[float]]]]:
        """Per record, the cyclic shifts used and, per shift, the letter log-likelihoods by position of the
        harness prompt whose options are rotated by that shift (`modes.rotate`): k forward passes."""
        jobs = [(r, s) for r, q in enumerate(records) for s in cyclic_shifts(len(q.choices), k)]
        rotated = [replace(records[r], choices=rotate(records[r].choices, s)) for r, s in jobs]
        lls = self.letter_loglikelihoods([harness_prompt(q, **ctx[r]) for q, (r, _) in zip(rotated, jobs)],
                                         [len(q.choices) for q in rotated])
        out: list[tuple[list[int], list[list[float]]]] = [([], []) for _ in records]
        for (r, s), row in zip(jobs, lls):
            out[r][0].append(s)
            out[r][1].append(row)
        return out

    def permuted(self, records: Sequence[MCQ], ctx: Sequence[dict], k: Optional[int]
                 ) -> tuple[list[list[float]], list[list[float]]]:
        """(letter log-likelihoods of the unrotated prompt, log of each option's permutation-averaged probability)."""
        per = self.position_logprobs(records, ctx, k)
        lls = [rows[shifts.index(0)] for shifts, rows in per]
        return lls, [permuted_option_logprobs([log_softmax(r) for r in rows], shifts) for shifts, rows in per]

    # --- what one question costs (a server's token budget) ------------------------------------------------
    def cost(self, q: MCQ, scoring: Union[str, ModeParams] = "letter", fewshot: Sequence[MCQ] = (),
             header: bool = True, passages: Optional[Sequence[str]] = None) -> "Cost":
        """What `score` runs for `q` in `scoring`'s mode, in input tokens: letter modes read the harness prompt
        once (permute: once per cyclic permutation), cloze reads the context once and then each option's tokens
        but the last on its KV cache (one full pass per option where the tokenizer merges context and option).
        Counted without the shared-prefix cache, which can only make it cheaper, and without padding."""
        params = as_params(scoring)
        ctx = dict(fewshot=fewshot, header=header, passages=passages)
        if params.mode == "cloze":
            prompt = cloze_prompt(q, template=params.cloze_template, **ctx)
            pairs = [self.encode_pair(prompt, f" {o}") for o in q.choices]
            longest = max(len(c) + len(x) for c, x in pairs)
            if all(c == pairs[0][0] for c, _ in pairs) and pairs[0][0] and longest <= self.max_length:
                return Cost(prompt, len(pairs[0][0]) + sum(len(x) - 1 for _, x in pairs), longest)
            return Cost(prompt, sum(len(self._truncate(c, x)) for c, x in pairs), longest)
        shifts = cyclic_shifts(len(q.choices), params.permute_k) if params.mode == "permute" else [0]
        prompts = [harness_prompt(replace(q, choices=rotate(q.choices, s)), **ctx) for s in shifts]
        pairs = [self.encode_pair(prompts[0], f" {LETTERS[j]}") for j in range(len(q.choices))]
        # as letter_loglikelihoods: one pass per prompt when every letter is one token after it. Checked on the
        # unrotated prompt only (n tokenizations per prompt would cost permute n^2): the rotations end in the same
        # "\nAnswer:", which is what the letters' tokens depend on.
        if all(len(c) == 1 and x == pairs[0][0] for x, c in pairs):
            lengths = [len(pairs[0][0])] + [len(self.tok(p)["input_ids"]) for p in prompts[1:]]
            return Cost(prompts[0], sum(min(n, self.max_length) for n in lengths), max(lengths) + 1)
        per_prompt = [pairs] + [[self.encode_pair(p, f" {LETTERS[j]}") for j in range(len(q.choices))]
                                for p in prompts[1:]]
        return Cost(prompts[0], sum(len(self._truncate(x, c)) for ps in per_prompt for x, c in ps),
                    max(len(x) + len(c) for ps in per_prompt for x, c in ps))


@dataclass(frozen=True)
class Cost:
    """One question's forward passes in an answer mode (`MCQScorer.cost`)."""

    prompt: str  # the context its options are scored after (permute: the unrotated harness prompt)
    tokens: int  # input tokens its forward passes read
    longest: int  # its longest sequence, context + scored continuation: what must fit the model's context


def predict(qid: str, subject: str, gold: str, lls: Sequence[float], scores: Sequence[float],
            params: ModeParams) -> Prediction:
    """The prediction from a mode's option scores: the top score's letter, softmax(scores / T), the unsure flag."""
    best = max(range(len(scores)), key=scores.__getitem__)
    probs = [round(p, 6) for p in softmax(scores, params.temperature)]
    # the flag compares the probability as shown with the threshold as stored (both to 6 places): the dev question
    # the threshold was taken from stays "sure" when rounding lifted the threshold above its unrounded confidence
    return Prediction(qid, subject, gold, LETTERS[best], [round(x, 6) for x in lls], probs,
                      mode=params.label(), scores=[round(x, 6) for x in scores],
                      unsure=None if params.unsure_below is None else max(probs) < params.unsure_below)


def cloze_prompt(q: MCQ, fewshot: Sequence[MCQ] = (), header: bool = True,
                 passages: Optional[Sequence[str]] = None, template: str = "header") -> str:
    """Cloze context: the question without lettered options, then `Answer:`; the answer text follows it.
    k-shot examples are rendered the same way, answered with their answer text (not a letter).

    template `header`: stemqa's (subject header when `header`, then `<question>\nAnswer:`); `question`: lm-eval's
    arc_easy / arc_challenge template `Question: <question>\nAnswer:`, no header, k-shot examples joined by a
    blank line (lm-eval's fewshot_delimiter)."""
    if template not in ("header", "question"):
        raise ValueError(f"cloze template must be 'header' or 'question', got {template!r}")
    lead = "Question: " if template == "question" else ""
    out = subject_header(q.subject) if header and template == "header" else ""
    for ex in fewshot:
        out += f"{lead}{ex.question.strip()}\nAnswer: {ex.choices[ex.answer]}\n\n"
    out += passages_block(passages or [])
    return out + f"{lead}{q.question.strip()}\nAnswer:"


def accuracy(preds: Sequence[Prediction]) -> dict:
    """Overall and per-subject accuracy."""
    by_subject: dict[str, list[bool]] = {}
    for p in preds:
        by_subject.setdefault(p.subject, []).append(p.pred == p.gold)
    n = len(preds)
    return {
        "accuracy": sum(p.pred == p.gold for p in preds) / n if n else 0.0,
        "n": n,
        "per_subject": {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(by_subject.items())},
    }
