"""Tests for sample.py.

- Sampling semantics against hand-derived distributions, on models whose logits are fixed by hand: temperature,
  top-k, top-p (exactly the expected tokens kept), greedy, sampling frequencies, seeds, EOS stopping, batches.
- Bad arguments and NaN logits raise clear errors (no silent fallback distribution).
- Streaming text: a multi-byte character split across tokens prints once and correctly; the stream equals
  a one-shot decode.
- KV cache: logits with the cache equal the recompute-everything reference at every step of a 100-token generation
  (RoPE and NoPE, sdpa and manual attention, batched prompts, and past the context window), and each step after
  the prompt feeds the model one position.
- load_model rebuilds model and tokenizer from a checkpoint written here; a missing/corrupt checkpoint or a missing
  tokenizer is a clear error.
- --eval: the sliding-window loss equals a brute-force F.cross_entropy reference.
- The CLI end to end on a tiny checkpoint: header, delimited samples, streamed text equal to a one-shot decode of
  the same seeded generation; bad arguments exit 2 with one line.

    python -m pytest tests/test_sample.py            # these tests (all fast)
    python -m pytest -m slow                       # the slow end-to-end checks of the whole suite
"""
import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sample
from lib.cli import BadInputError
from lib.checkpoints import tokenizer_identity
from bpe import Tokenizer, train_bpe
from model import KVCache, ModelConfig, TransformerLM
from sample import (TextStream, check_sampling_args, evaluate, generate, generate_stream, load_model, next_logits,
                    sample_next, sampling_probs)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: with one thread they run ~10x faster on a busy 2-core machine (no OpenMP workers
    spinning for a core); the previous setting is restored for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def test_stream_rejects_an_id_outside_the_vocab():
    with pytest.raises(ValueError, match="not in the tokenizer's vocab"):
        TextStream({0: b"a"}).push(1)


def test_stream_equals_one_shot_decode_on_random_bytes():
    # Random single-byte and two-byte tokens: plenty of split characters and invalid bytes (-> U+FFFD).
    gen = torch.Generator().manual_seed(0)
    vocab = {i: bytes([i]) for i in range(256)}
    vocab |= {256 + i: bytes([0xC3, 0x80 + i]) for i in range(64)}
    pool = list(range(0x41, 0x5B)) + [0xC3, 0xE2, 0x82, 0xAC, 0xA9, 0xF0, 0x9F, 0x99, 0x82, 0xFF]
    pool += list(range(256, 320))
    ids = [pool[i] for i in torch.randint(len(pool), (2000,), generator=gen).tolist()]
    stream = TextStream(vocab)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------------
# KV cache: equal to the reference at every step


def small_model(seed=0, fast=False, **overrides):
    config = ModelConfig(vocab_size=64, context_length=128, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    config = dataclasses.replace(config, **overrides)
    torch.manual_seed(seed)
    return TransformerLM(**dataclasses.asdict(config), fast=fast).eval()


@pytest.mark.parametrize("overrides, batch", [
    (dict(), 1),
    (dict(position="nope"), 1),
    (dict(attn_impl="manual"), 1),
    (dict(), 3),                               # three different prompts at once
    (dict(context_length=32), 2),              # 105 tokens > 32: re-encodes the last window past the limit
])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])  # the CLI samples with fast=True
def test_cache_logits_equal_the_reference_at_every_step(overrides, batch, fast):
    model = small_model(fast=fast, **overrides)
    prompts = torch.randint(64, (batch, 5), generator=torch.Generator().manual_seed(1))
    new = generate(model, prompts, 100, generator=torch.Generator().manual_seed(2))  # sampled with the cache
    assert new.shape == (batch, 100)
    seq = torch.cat([prompts, new], dim=1)                                 # (B, 105)
    cache = KVCache()
    with torch.inference_mode():
        for t in range(5, 105):                                            # the 100 steps generate took
            cached, cache = next_logits(model, seq[:, :t], cache)
            reference, _ = next_logits(model, seq[:, :t], None)
            torch.testing.assert_close(cached, reference, rtol=1e-4, atol=1e-4, msg=f"step {t - 5}")
    # and the whole loop, reference vs cache, draws the same tokens from the same seed
    again = generate(model, prompts, 100, generator=torch.Generator().manual_seed(2), use_cache=False)
    assert torch.equal(new, again)


def test_cache_feeds_one_position_per_step():
    model = small_model()
    lengths = []
    model.register_forward_hook(lambda module, args, output: lengths.append(args[0].shape[1]))
    generate(model, torch.zeros(2, 7, dtype=torch.long), 10, temperature=0)
    assert lengths == [7] + [1] * 9                                        # the prompt once, then one token each
    lengths.clear()
    generate(model, torch.zeros(2, 7, dtype=torch.long), 10, temperature=0, use_cache=False)
    assert lengths == list(range(7, 17))                                   # the reference recomputes everything


# ----------------------------------------------------------------------------------------------------------------------
# A tiny checkpoint, written here in train.py's layout


TEXT = ("Once upon a time, a café owner named Zoë baked crème brûlée for the naïve bears. "
        "They said: “très bien” and ate it all. The end. ") * 20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(checkpoint path, tokenizer dir): a 300-token BPE trained here and a random-init model saved as train.py does."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus.txt"
    corpus.write_text((TEXT + "<|endoftext|>") * 3, encoding="utf-8")
    vocab, merges = train_bpe(corpus, 300, special_tokens=["<|endoftext|>"])
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    Tokenizer(vocab, merges, ["<|endoftext|>"]).save_dir(tok_dir)
    config = ModelConfig(vocab_size=len(vocab), context_length=64, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    torch.manual_seed(0)
    model = TransformerLM(**dataclasses.asdict(config))
    ckpt = dict(model=model.state_dict(), optimizer={}, iteration=7, model_config=dataclasses.asdict(config),
                train_args={}, rng={}, tokenizer_dir=str(tok_dir), **tokenizer_identity(tok_dir))  # as train.py
    torch.save(ckpt, root / "last.pt")
    return root / "last.pt", tok_dir


def test_load_model_rebuilds_model_and_tokenizer(tiny_run):
    ckpt_path, tok_dir = tiny_run
    model, tokenizer, ckpt = load_model(ckpt_path, "cpu")
    assert ckpt["iteration"] == 7 and not model.training
    reference = TransformerLM(**ckpt["model_config"])
    reference.load_state_dict(torch.load(ckpt_path, weights_only=True)["model"])
    ids = torch.tensor([tokenizer.encode("Once upon a time")])
    torch.testing.assert_close(model(ids), reference(ids))
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_load_model_fast_is_the_same_model_and_tokenizer_sooner(tiny_run):
    ckpt_path, _ = tiny_run
    plain, plain_tok, _ = load_model(ckpt_path, "cpu")
    fast, fast_tok, _ = load_model(ckpt_path, "cpu", fast=True)  # what `python sample.py` loads
    assert {getattr(m, "fast", False) for m in plain.modules()} == {False} and not plain_tok.fast
    assert True in {getattr(m, "fast", False) for m in fast.modules()} and fast_tok.fast
    assert fast_tok.encode(TEXT) == plain_tok.encode(TEXT)
    ids = torch.tensor([plain_tok.encode("Once upon a time")])
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_load_model_errors(tiny_run, tmp_path):
    # sample.py reads checkpoints with lib/checkpoints.read_checkpoint: one set of one-line messages (BadInputError,
    # a ValueError, which the CLI turns into exit code 2)
    ckpt_path, tok_dir = tiny_run
    with pytest.raises(BadInputError, match="nope.pt does not exist: pass a .pt file train.py wrote"):
        load_model(tmp_path / "nope.pt", "cpu")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(BadInputError, match="garbage.pt is corrupt or not a train.py checkpoint"):
        load_model(tmp_path / "garbage.pt", "cpu")
    (tmp_path / "truncated.pt").write_bytes(ckpt_path.read_bytes()[:5000])
    with pytest.raises(BadInputError, match="truncated.pt is corrupt or not a train.py checkpoint"):
        load_model(tmp_path / "truncated.pt", "cpu")
    torch.save({"iteration": 3}, tmp_path / "no_model.pt")
    with pytest.raises(BadInputError, match="no 'model'/'iteration' entries"):
        load_model(tmp_path / "no_model.pt", "cpu")
    ckpt = torch.load(ckpt_path, weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, tmp_path / "no_config.pt")
    with pytest.raises(BadInputError, match="no 'model_config' entry"):
        load_model(tmp_path / "no_config.pt", "cpu")
    torch.save(ckpt | dict(tokenizer_dir=str(tmp_path / "gone")), tmp_path / "moved.pt")
    with pytest.raises(BadInputError, match="has no vocab.json and merges.txt: pass --tokenizer DIR"):
        load_model(tmp_path / "moved.pt", "cpu")
    _, tokenizer, _ = load_model(tmp_path / "moved.pt", "cpu", tokenizer_dir=tok_dir)   # the override fixes it
    assert tokenizer.vocab_size == ckpt["model_config"]["vocab_size"]
    bad = dict(ckpt, model_config=ckpt["model_config"] | dict(d_model=64))
    torch.save(bad, tmp_path / "mismatch.pt")
    with pytest.raises(BadInputError, match="mismatch.pt: weights do not match the model .*size mismatch"):
        load_model(tmp_path / "mismatch.pt", "cpu")


# ----------------------------------------------------------------------------------------------------------------------
# --eval: sliding-window loss


def test_evaluate_stride_1_is_the_full_context_loss_of_every_token():
    model = small_model(context_length=16)
    ids = np.random.default_rng(0).integers(0, 64, size=41)
    loss, n = evaluate(model, ids, stride=1, batch_size=5)
    # brute force: token j is predicted from the (up to) 16 tokens before it
    with torch.no_grad():
        losses = [F.cross_entropy(model(torch.tensor(ids[max(0, j - 16):j])[None])[0, -1], torch.tensor(ids[j]))
                  for j in range(1, 41)]
    assert n == 40
    assert loss == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


@pytest.mark.parametrize("n_ids", [41, 49, 10])                            # ragged end, exact fit, one short window
def test_evaluate_default_stride_is_non_overlapping_windows(n_ids):
    model = small_model(context_length=16)
    ids = np.random.default_rng(1).integers(0, 64, size=n_ids)
    loss, n = evaluate(model, ids)
    # reference: windows ids[0:17], ids[16:33], ... each scores all its targets; the ragged tail is scored with a
    # full window ending at the last token
    expected = []
    with torch.no_grad():
        for end in list(range(16, n_ids - 1, 16)) + [n_ids - 1]:
            start = max(0, end - 16)
            window = torch.tensor(ids[start:end + 1])[None]
            targets_new = end - (len(expected) and sum(len(e) for e in expected))
            per_token = F.cross_entropy(model(window[:, :-1])[0], window[0, 1:], reduction="none")
            expected.append(per_token[-targets_new:])
    expected = torch.cat(expected)
    assert n == n_ids - 1 == expected.numel()
    assert loss == pytest.approx(expected.mean().item(), rel=1e-5)


def test_evaluate_rejects_out_of_vocab_ids():
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate(small_model(), np.array([1, 2, 64, 3]))


# ----------------------------------------------------------------------------------------------------------------------
# The command line


def run_cli(capsys, *argv):
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_cli_samples_stream_the_same_text_as_a_one_shot_decode(tiny_run, capsys):
    ckpt_path, _ = tiny_run
    out = run_cli(capsys, ckpt_path, "--prompt", "Once upon a café", "--max-new-tokens", 40, "--num-samples", 3,
                  "--seed", 5, "--temperature", 1.5, "--top-k", 200, "--device", "cpu")
    header = out.splitlines()[:3]
    assert "iteration 7" in header[0]
    assert "temperature 1.5" in header[1] and "seed 5" in header[1] and "max_new_tokens 40" in header[1]
    assert "top_k 200" in header[1] and "num_samples 3" in header[1]
    # redo the same seeded generation in-process and decode it in one shot
    model, tokenizer, _ = load_model(ckpt_path, "cpu")
    prompt = tokenizer.encode("Once upon a café")
    assert f"({len(prompt)} tokens" in header[2]
    eot = tokenizer.special_token_ids["<|endoftext|>"]
    new = generate(model, torch.tensor([prompt] * 3), 40, temperature=1.5, top_k=200, eos_id=eot,
                   generator=torch.Generator().manual_seed(5))
    for row in range(3):
        ids = new[row].tolist()
        ids = ids[:ids.index(eot)] if eot in ids else ids
        body = out.split(f"=== sample {row + 1}/3 ===\n")[1].split(f"\n=== end of sample {row + 1}/3: ")
        assert body[0] == "Once upon a café" + tokenizer.decode(ids)
        assert body[1].startswith(f"{len(ids)} new tokens")


def test_cli_eval_matches_evaluate(tiny_run, tmp_path, capsys):
    ckpt_path, _ = tiny_run
    model, tokenizer, _ = load_model(ckpt_path, "cpu")
    ids = np.array(tokenizer.encode(TEXT), dtype=np.uint16)
    np.save(tmp_path / "valid.npy", ids)
    (tmp_path / "valid.txt").write_text(TEXT, encoding="utf-8")
    loss, n = evaluate(model, ids.astype(np.int64), stride=32)
    for name in ("valid.npy", "valid.txt"):
        out = run_cli(capsys, ckpt_path, "--eval", tmp_path / name, "--eval-stride", 32)
        assert f"loss {loss:.4f} nats/token · perplexity {math.exp(loss):.3f} · {n:,} tokens scored" in out


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.01"], "top_p"),
    (["--top-k", "0"], "top_k"),
    (["--top-k", "many"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-new-tokens", "-2"], "--max-new-tokens"),
    (["--device", "toaster"], "--device"),
    (["--tokenizer", "/nonexistent/tok"], "--tokenizer"),
    (["--eval", "/nonexistent/valid.npy"], "--eval"),
    (["--eval", __file__, "--eval-stride", "0"], "stride"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tiny_run, capsys, argv, message):
    ckpt_path, _ = tiny_run
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(ckpt_path), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("sample.py: error:") and message in err, err


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(tmp_path / "missing.pt")])
    assert exit_info.value.code == 2 and "missing.pt does not exist" in capsys.readouterr().err


def test_cli_runs_as_a_script(tiny_run):
    ckpt_path, _ = tiny_run
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), str(ckpt_path), "--max-new-tokens", "5",
                             "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "=== end of sample 1/1:" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# layers: sample.py stands on lib/checkpoints.py, not on train.py (and train.py does not reach up to sample.py)


IMPORTS = """
import sys
sys.path.insert(0, {root!r})
import {module}
print(" ".join(sorted(m for m in ("train", "sample", "lib.runs", "lib.demo", "lib.evaluation") if m in sys.modules)))
"""


@pytest.mark.parametrize("module, loaded", [("sample", "sample"), ("train", "train")])
def test_importing_a_chapter_loads_no_chapter_above_it_and_no_run_management(module, loaded):
    done = subprocess.run([sys.executable, "-c", IMPORTS.format(root=str(ROOT), module=module)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == [loaded]


EVALUATES = """
import sys
sys.path.insert(0, {root!r})
import numpy as np, sample
from model import TransformerLM
model = TransformerLM(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
loss, n = sample.evaluate(model, np.arange(40) % 32)
print(n, "train" in sys.modules)
"""


def test_scoring_a_file_never_loads_train_py():
    # sample.py --eval goes through lib/evaluation.py and lib/batches.py, which stand below train.py
    done = subprocess.run([sys.executable, "-c", EVALUATES.format(root=str(ROOT))], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["39", "False"]


LOWER_FLOOR = ("lib.cli", "lib.kernels", "lib.fused_optim", "lib.fast_bpe", "lib.batches", "lib.cpu_tuning")
CHAPTERS = ("bpe", "model", "optim", "accounting", "train", "sample")


def project_imports(path: Path, top_level_only: bool) -> set[str]:
    """The project modules (chapters and lib.X) a file imports: at its top level, or anywhere in it."""
    import ast
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "lib":
                names.update(f"lib.{a.name}" for a in node.names)
    return names & ({p.stem for p in ROOT.glob("*.py")} | {f"lib.{p.stem}" for p in (ROOT / "lib").glob("*.py")})


def module_files() -> dict[str, Path]:
    return {**{p.stem: p for p in ROOT.glob("*.py")}, **{f"lib.{p.stem}": p for p in (ROOT / "lib").glob("*.py")}}


def test_the_top_level_import_graph_has_no_cycle():
    # A chapter's CLI may reach an operations module of lib/ inside its command function (that module imports the
    # chapter back); what loads at import time must be a tree of layers.
    graph = {name: project_imports(path, top_level_only=True) for name, path in module_files().items()}
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name not in done:
            path.append(name)
            for dep in sorted(graph.get(name, ())):
                visit(dep)
            path.pop()
            done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_speed_layer_imports_no_chapter():
    # lib/'s lower floor takes what it needs as arguments: importing a chapter from it, even inside a function,
    # would make the chapters and their speed layer depend on each other.
    files = module_files()
    for name in LOWER_FLOOR:
        assert not project_imports(files[name], top_level_only=False) & set(CHAPTERS), name
