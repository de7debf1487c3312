"""Batched generation (`Generator.generate_many`, what the served /v1/completions and chat batch through) against
one prompt at a time, on the real SmolLM2-135M-Instruct: same greedy tokens, same log-probs, rows cut at eos."""
import pytest
import torch

from stemqa.eval.scorer import MCQScorer
from stemqa.models.loader import load_causal_lm, load_tokenizer

from serve.generation import Generator

PROMPTS = ["Newton's second law states that",
           "Question: What is the chemical symbol of sodium?\nAnswer:",
           "The derivative of x squared with respect to x is",
           "Photosynthesis in green plants converts light energy into chemical energy stored in"]


@pytest.fixture(scope="module")
def generator(smollm2):
    torch.set_num_threads(1)
    tok = load_tokenizer(smollm2)
    model = load_causal_lm(smollm2, dtype="float32")
    return Generator(model, tok, MCQScorer(model, tok))


def test_generate_many_equals_one_at_a_time(generator):
    encoded = [generator.encode(p) for p in PROMPTS]
    assert len({len(e) for e in encoded}) >= 3  # different lengths: the batch is left-padded
    batched = generator.generate_many(encoded, 12, 0.0, 1.0, with_logprobs=True)
    for ids, (new, rows) in zip(encoded, batched):
        alone, alone_rows = generator.generate(ids, 12, 0.0, 1.0, None)
        assert new == alone and len(new) > 0
        assert rows.shape == alone_rows.shape
        assert torch.allclose(rows, alone_rows, atol=1e-3), float((rows - alone_rows).abs().max())
    no_rows = generator.generate_many(encoded, 12, 0.0, 1.0, with_logprobs=False)
    assert [n for n, _ in no_rows] == [n for n, _ in batched] and all(r is None for _, r in no_rows)


def test_generate_many_cuts_each_row_at_its_eos(generator):
    """A chat prompt the instruct model answers briefly: its row ends at eos while a longer one goes on."""
    tok = generator.tok
    chat = tok.apply_chat_template([{"role": "user", "content": "Reply with one word: what colour is the sky?"}],
                                   tokenize=False, add_generation_prompt=True)
    encoded = [tok(chat, add_special_tokens=False)["input_ids"], generator.encode(PROMPTS[0])]
    (short, _), (long, _) = generator.generate_many(encoded, 40, 0.0, 1.0, with_logprobs=False)
    assert short[-1] in generator.stop_ids and not generator.stop_ids & set(short[:-1]) and len(short) < 40
    assert short == generator.generate(encoded[0], 40, 0.0, 1.0, None)[0]
    assert len(long) == 40 or long[-1] in generator.stop_ids
    assert [new for new, _ in generator.generate_many(encoded, 0, 0.0, 1.0, with_logprobs=False)] == [[], []]
