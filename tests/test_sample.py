"""Tests for sample.py.

- Sampling semantics against hand-derived distributions, on models whose logits are fixed by hand: temperature,
  top-k, top-p (exactly the expected tokens kept), greedy, sampling frequencies, seeds, EOS stopping, batches.
- Bad arguments and NaN logits raise clear errors (no silent fallback distribution).
- Streaming text: a multi-byte character split across tokens prints once and correctly; the stream equals
  a one-shot decode.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from sample import TextStream, check_sampling_args, generate, generate_stream, sample_next, sampling_probs


# ----------------------------------------------------------------------------------------------------------------------
# Models whose logits are fixed by hand


class FixedLogits(torch.nn.Module):
    """Every position gets the same next-token logits row (V,)."""

    def __init__(self, logits, context_length=64):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32), requires_grad=False)
        self.config = SimpleNamespace(context_length=context_length, vocab_size=self.logits.numel())

    def forward(self, idx, kv_cache=None):
        assert kv_cache is None, "a hand-made model has no cache: call generate(..., use_cache=False)"
        B, T = idx.shape
        return self.logits.expand(B, T, -1)


class Bigram(torch.nn.Module):
    """Next-token logits are table[last token]: a chain 0 -> 1 -> 2 -> 3 -> 0 when sampled greedily."""

    def __init__(self, vocab_size=4, context_length=64):
        super().__init__()
        table = torch.zeros(vocab_size, vocab_size)
        table[torch.arange(vocab_size), (torch.arange(vocab_size) + 1) % vocab_size] = 5.0
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(context_length=context_length, vocab_size=vocab_size)

    def forward(self, idx, kv_cache=None):
        assert kv_cache is None
        return self.table[idx]                                              # (B, T, V)


PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])                                  # deliberately not sorted
LOGITS = PROBS.log()[None]                                                  # (1, 4)


# ----------------------------------------------------------------------------------------------------------------------
# One step: temperature, top-k, top-p, greedy


def test_plain_sampling_probs_are_the_softmax():
    torch.testing.assert_close(sampling_probs(LOGITS)[0], PROBS)


@pytest.mark.parametrize("top_p, kept", [
    (0.35, [1]),            # 0.4 alone reaches 0.35
    (0.5, [1, 3]),          # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    (0.75, [1, 3, 2]),      # 0.7 < 0.75, 0.9 >= 0.75
    (0.95, [1, 3, 2, 0]),   # 0.9 < 0.95: everything
    (1.0, [1, 3, 2, 0]),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    torch.testing.assert_close(sampling_probs(LOGITS, top_p=top_p)[0], expected)


def test_top_p_keeps_at_least_one_token():
    # One token holds almost everything; a tiny p still keeps it (and only it).
    probs = sampling_probs(torch.tensor([[10.0, 0.0, 0.0]]), top_p=1e-6)[0]
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("top_k, kept", [(1, [1]), (2, [1, 3]), (3, [1, 3, 2]), (4, [0, 1, 2, 3]), (99, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(top_k, kept):
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept] / PROBS[kept].sum()
    torch.testing.assert_close(sampling_probs(LOGITS, top_k=top_k)[0], expected)


def test_top_k_keeps_ties_with_the_kth():
    probs = sampling_probs(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), top_k=1)[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5, 0.5, 0.0]))


def test_temperature_scales_the_logits():
    logits = torch.tensor([[0.0, math.log(2.0)]])                           # probabilities 1/3, 2/3
    torch.testing.assert_close(sampling_probs(logits, temperature=0.5)[0], torch.tensor([0.2, 0.8]))  # 1 : 4
    r = math.sqrt(2.0)
    torch.testing.assert_close(sampling_probs(logits, temperature=2.0)[0], torch.tensor([1 / (1 + r), r / (1 + r)]))


def test_order_is_temperature_then_top_k_then_top_p():
    # A hot temperature flattens [0.1, 0.4, 0.2, 0.3] to nearly uniform, so top_p=0.6 now needs three tokens
    # (it needed two at temperature 1); top_k=3 applied first removes token 0 whatever p is.
    probs = sampling_probs(LOGITS, temperature=1e3, top_p=0.6)[0]
    assert (probs > 0).tolist() == [False, True, True, True]
    probs = sampling_probs(LOGITS, temperature=1e3, top_k=3, top_p=0.99)[0]
    assert (probs > 0).tolist() == [False, True, True, True]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_batch_rows_are_filtered_independently():
    logits = torch.stack([PROBS.log(), PROBS.flip(0).log()])                # (2, 4)
    probs = sampling_probs(logits, top_p=0.5)
    assert (probs > 0).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_sampled_frequencies_match_the_filtered_distribution():
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(LOGITS.expand(n, -1), top_p=0.75, generator=gen)     # keeps 0.4, 0.3, 0.2
    freq = torch.bincount(ids, minlength=4).double() / n
    expected = torch.tensor([0.0, 4 / 9, 2 / 9, 3 / 9], dtype=torch.double)
    assert freq[0] == 0                                                     # a dropped token is never drawn
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (freq, expected)


def test_greedy_is_argmax_and_ignores_the_generator():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    a = sample_next(logits, temperature=0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, temperature=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, b)
    # top_k=1 at any temperature is the same choice
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), a)


# ----------------------------------------------------------------------------------------------------------------------
# The loop: seeds, EOS, batches, bad arguments


def test_a_seed_makes_sampling_reproducible():
    model = FixedLogits(torch.zeros(16))                                    # uniform over 16 tokens
    run = lambda seed: generate(model, [0], 60, generator=torch.Generator().manual_seed(seed), use_cache=False)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))                                  # equal by chance with prob 16**-60


def test_greedy_generation_follows_the_chain_and_stops_at_eos():
    model = Bigram()
    out = generate(model, [0], 10, temperature=0, eos_id=3, use_cache=False)
    assert out.tolist() == [1, 2, 3]
    # without an EOS id it runs the full length
    out = generate(model, [0], 6, temperature=0, use_cache=False)
    assert out.tolist() == [1, 2, 3, 0, 1, 2]


def test_batched_rows_stop_separately_and_pad_with_eos():
    model = Bigram()
    out = generate(model, torch.tensor([[0], [2]]), 10, temperature=0, eos_id=3, use_cache=False)
    assert out.tolist() == [[1, 2, 3], [3, 3, 3]]
    steps = list(generate_stream(model, torch.tensor([[0], [2]]), 10, temperature=0, eos_id=3, use_cache=False))
    assert [s.tolist() for s in steps] == [[1, 3], [2, 3], [3, 3]]


def test_empty_prompt_starts_from_eos():
    out = generate(Bigram(), [], 2, temperature=0, eos_id=3, use_cache=False)
    assert out.tolist() == [0, 1]
    with pytest.raises(ValueError, match="empty prompt"):
        generate(Bigram(), [], 2, temperature=0, use_cache=False)


def test_zero_new_tokens():
    assert generate(Bigram(), [0], 0, use_cache=False).tolist() == []
    assert generate(Bigram(), torch.zeros(3, 2, dtype=torch.long), 0, use_cache=False).shape == (3, 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-3), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_bad_sampling_arguments_raise(kwargs, message):
    args = dict(temperature=1.0, top_p=1.0, top_k=None) | kwargs
    with pytest.raises(ValueError, match=message):
        check_sampling_args(**args)
    with pytest.raises(ValueError, match=message):
        generate(Bigram(), [0], 5, use_cache=False, **kwargs)


def test_negative_max_new_tokens_raises():
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(Bigram(), [0], -1, use_cache=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_an_error(temperature):
    logits = torch.zeros(5)
    logits[2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        generate(FixedLogits(logits), [0], 3, temperature=temperature, use_cache=False)


def test_inf_logit_is_an_error_not_a_fallback():
    with pytest.raises(FloatingPointError, match="NaN"):
        sample_next(torch.tensor([[0.0, float("inf"), 0.0]]))


# ----------------------------------------------------------------------------------------------------------------------
# Streaming text


def test_a_character_split_across_tokens_prints_once():
    euro, emoji = "€".encode(), "🙂".encode()                              # 3 and 4 bytes
    vocab = {0: b"a", 1: b"\xc3", 2: b"\xa9", 3: euro[:1], 4: euro[1:], 5: emoji[:1], 6: emoji[1:2], 7: emoji[2:]}
    stream = TextStream(vocab)
    pieces = [stream.push(i) for i in [0, 1, 2, 3, 4, 5, 6, 7, 0]]
    assert pieces == ["a", "", "é", "", "€", "", "", "🙂", "a"]          # nothing twice, nothing broken
    assert "".join(pieces) + stream.flush() == "aé€🙂a"


def test_stream_equals_one_shot_decode_on_random_bytes():
    # Random single-byte and two-byte tokens: plenty of split characters and invalid bytes (-> U+FFFD).
    gen = torch.Generator().manual_seed(0)
    vocab = {i: bytes([i]) for i in range(256)}
    vocab |= {256 + i: bytes([0xC3, 0x80 + i]) for i in range(64)}
    pool = list(range(0x41, 0x5B)) + [0xC3, 0xE2, 0x82, 0xAC, 0xA9, 0xF0, 0x9F, 0x99, 0x82, 0xFF] + list(range(256, 320))
    ids = [pool[i] for i in torch.randint(len(pool), (2000,), generator=gen).tolist()]
    stream = TextStream(vocab)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
