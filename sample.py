"""Decoding: sample text from a trained checkpoint, with a KV cache, streaming, and a perplexity check.

CS336 assignment 1, §6 (decoding). One step turns the model's logits for the last position into the next token:
temperature (0 = greedy argmax) → top-k → top-p (nucleus, Holtzman et al. 2019) → sample. `generate` repeats that
step, feeding each new token back. With the KV cache (`use_cache=True`, the default) every layer keeps the keys
(after RoPE, at their absolute positions) and values it has already computed, so a new token costs one position's
work instead of re-running the whole context; `use_cache=False` recomputes the context every step and is the
reference the cache is tested against (tests/test_sample.py: equal logits at every step).

Past the context window: once the sequence is longer than context_length, each step re-encodes the last
context_length tokens with a fresh cache. That is exact (the same logits as the reference, which crops to the last
window), but from then on every step costs a full window. A "rolling" cache that just drops the oldest entry is not
exact: the kept keys and values were computed while the dropped tokens were still in view, so they would describe a
context the reference no longer sees.

    python sample.py runs/demo/last.pt --prompt "Once upon a time" --temperature 0.8 --top-p 0.95
    python sample.py runs/demo/last.pt --num-samples 4 --seed 1 --max-new-tokens 100
    python sample.py runs/demo/last.pt --eval data/valid.npy      # per-token loss and perplexity over a file
"""
import argparse
import codecs
import dataclasses
import math
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------------
# One decoding step: logits of the last position -> the next token


def check_sampling_args(temperature: float, top_p: float, top_k: int | None) -> None:
    """Raise ValueError with one clear line for a setting that does not define a distribution."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, or None for off, got {top_k!r}")


def _check_not_nan(x: torch.Tensor, what: str) -> None:
    # note: .any() reads one bool back, a device sync on GPU; a NaN must stop generation, never be sampled around.
    if torch.isnan(x).any():
        raise FloatingPointError(f"{what} contain NaN: the model's weights or inputs are broken "
                                 "(a diverged checkpoint?); refusing to sample from them")


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution the next token is drawn from: logits (B, V) -> probabilities (B, V), temperature > 0.

    Over probabilities [0.4, 0.3, 0.2, 0.1] (temperature 1): top_k=3 keeps the first three and renormalises them to
    [4/9, 3/9, 2/9, 0]; top_p=0.5 keeps [0.4, 0.3] (the smallest set whose mass reaches 0.5) -> [4/7, 3/7, 0, 0].
    """
    if temperature <= 0:
        raise ValueError(f"sampling_probs needs temperature > 0 (temperature 0 is greedy argmax), got {temperature}")
    _check_not_nan(logits, "logits")
    # temperature: divide the logits; < 1 sharpens the distribution, > 1 flattens it. Float32 so that bf16 logits
    # do not lose the small differences a low temperature magnifies.
    logits = logits.float() / temperature                                   # (B, V)
    # top-k: keep the k largest logits (ties with the k-th are kept too); k >= V keeps everything.
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)                                   # (B, V)
    _check_not_nan(probs, "probabilities (an +inf logit, or every logit -inf)")
    # top-p: keep the smallest set of most likely tokens whose total probability reaches p. A token is dropped when
    # the tokens ranked above it already reach p; the top token has nothing above it, so at least one is kept.
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)            # (B, V), (B, V)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs              # (B, V); exactly 0 for the top token
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_above >= top_p)  # vocab order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of every row: logits (B, V) -> ids (B,). Temperature 0 is greedy (argmax, no randomness)."""
    if temperature == 0:
        _check_not_nan(logits, "logits")
        return logits.argmax(dim=-1)                                        # (B,); the first index on ties
    probs = sampling_probs(logits, temperature, top_k, top_p)               # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------------------------------------------------
# The decoding loop, with the KV cache and without (the reference)


def prompt_batch(prompt_ids, eos_id: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prompt ids -> (B, T) int64 on device. A list or 1-D tensor is one row; a (B, T) tensor is B prompts of equal
    length. An empty prompt starts from eos_id (the document separator: "a new document begins here")."""
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx[None]                                                     # (1, T)
    if idx.dim() != 2:
        raise ValueError(f"prompt_ids must be a list of ids, a 1-D or a (B, T) tensor, got shape {tuple(idx.shape)}")
    if idx.size(1) == 0:
        if eos_id is None:
            raise ValueError("empty prompt and no eos_id to start from: give at least one prompt token, or eos_id")
        idx = torch.full((idx.size(0), 1), eos_id, dtype=torch.long, device=device)
    return idx


def next_logits(model, idx: torch.Tensor, cache=None):
    """Logits (B, V) of the token after idx (B, T), and the cache to pass to the next call (None = no cache).

    Without a cache (the reference): crop to the last context_length tokens and recompute all of them. With one:
    feed only the tokens the cache has not seen (the whole prompt on the first call, then one token per step), unless
    the sequence has outgrown the window, in which case a fresh cache re-encodes the last window (see the header).
    """
    ctx = model.config.context_length
    # crop: the model can only see the last context_length tokens
    window = idx[:, -ctx:]                                                  # (B, min(T, ctx))
    if cache is None:
        return model(window)[:, -1, :], None
    if idx.size(1) > ctx:
        # subtle: the cached positions 0..ctx-1 now hold tokens that fell out of the window; start over.
        from model import KVCache  # TODO: module level once model.py is merged
        cache = KVCache()
    logits = model(window[:, cache.seq_len:], kv_cache=cache)               # (B, T_new, V); advances cache.seq_len
    # last logits: only the final position predicts the next token
    return logits[:, -1, :], cache


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_stream(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True):
    """Yield the next token of every row, (B,) int64, one step at a time (for streaming).

    A row that has produced eos_id keeps yielding eos_id (padding) while other rows go on; the loop ends when
    every row has produced it, or after max_new_tokens steps. eos_id=None never stops early.
    """
    check_sampling_args(temperature, top_p, top_k)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    idx = prompt_batch(prompt_ids, eos_id, _device_of(model))               # (B, T)
    cache = None
    if use_cache:
        from model import KVCache  # TODO: module level once model.py is merged
        cache = KVCache()
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    for _ in range(max_new_tokens):
        # crop to the window and take the last position's logits (with or without the cache)
        logits, cache = next_logits(model, idx, cache)                      # (B, V)
        # temperature → top-k → top-p → sample (greedy when temperature is 0)
        next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished, eos_id)                 # ended rows only pad
        # append: the new token is part of the context for the next step
        idx = torch.cat([idx, next_id[:, None]], dim=1)                     # (B, T+1)
        yield next_id
        # stop at EOS, once every row has produced it
        if eos_id is not None:
            finished |= next_id == eos_id
            if finished.all():
                return


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """The new ids: (B, N) for B prompts, or (N,) for a 1-D prompt, N <= max_new_tokens. A row that ended at eos_id
    is padded with eos_id; N < max_new_tokens only when every row ended. Arguments as in `generate_stream`."""
    one_row = torch.as_tensor(prompt_ids).dim() == 1
    steps = list(generate_stream(model, prompt_ids, max_new_tokens, temperature, top_p, top_k, eos_id, generator,
                                 use_cache))
    batch = prompt_batch(prompt_ids, eos_id).size(0)
    new = torch.stack(steps, dim=1) if steps else torch.empty(batch, 0, dtype=torch.long)  # (B, N)
    return new[0] if one_row else new


# ----------------------------------------------------------------------------------------------------------------------
# Streaming text: token bytes -> complete characters


class TextStream:
    """Turns token ids into printable text as they arrive. A token can end in the middle of a UTF-8 character (byte
    level BPE splits "é" = C3 A9 freely); the incremental decoder holds such bytes back until the character is
    complete, so it prints once and correctly. Invalid bytes become U+FFFD, exactly as Tokenizer.decode does."""

    def __init__(self, vocab: dict[int, bytes]):
        self.vocab = vocab
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that became complete with this token ("" while a character is still unfinished)."""
        return self._utf8.decode(self.vocab[token_id])

    def flush(self) -> str:
        """The end of the stream: an unfinished character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
