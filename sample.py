"""Decoding: sample text from a trained checkpoint, with a KV cache, streaming, and a perplexity check.

CS336 assignment 1, §6 (decoding). One step turns the model's logits for the last position into the next token:
temperature (0 = greedy argmax) → top-k (Fan et al. 2018) → top-p (nucleus, Holtzman et al. 2019) → sample.
`generate` repeats that step, feeding each new token back. With the KV cache (`use_cache=True`, the default) every
layer keeps the keys (after RoPE, at their absolute positions) and values it has already computed, so a new token
costs one position's work instead of re-running the whole context; `use_cache=False` recomputes the context every
step and is the reference the cache is tested against (tests/test_sample.py: equal logits at every step).

Past the context window: once the sequence is longer than context_length, each step re-encodes the last
context_length tokens with a fresh cache. That is exact (the same logits as the reference, which crops to the last
window), but from then on every step costs a full window. A "rolling" cache that just drops the oldest entry is not
exact: the kept keys and values were computed while the dropped tokens were still in view, so they would describe a
context the reference no longer sees.

    python sample.py runs/demo/last.pt --prompt "Once upon a time" --temperature 0.8 --top-p 0.95
    python sample.py runs/demo/last.pt --num-samples 4 --seed 1 --max-new-tokens 100
    python sample.py runs/demo/last.pt --eval data/valid.npy      # per-token loss and perplexity over a file

sample.py does not import train.py: it reads checkpoints and picks the device with lib/checkpoints.py; --eval scores
a file with lib/evaluation.py, the evaluator of train.py's validation loss (it reads windows with lib/batches.py, as
train.get_batch does).
"""
import codecs
import dataclasses
import math
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bpe import END_OF_TEXT
from lib.cli import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, EnvironmentFault, OneLineParser
from model import KVCache, TransformerLM

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
        cache = KVCache()
    logits = model(window[:, cache.seq_len:], kv_cache=cache)               # (B, T_new, V); advances cache.seq_len
    # last logits: only the final position predicts the next token
    return logits[:, -1, :], cache


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def generate_stream(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int | None = None, eos_id: int | None = None, generator: torch.Generator | None = None,
                    use_cache: bool = True, n_tokens: int | None = None):
    """Yield the next token of every row, (B,) int64, one step at a time (for streaming).

    A row that has produced eos_id keeps yielding eos_id (padding) while other rows go on; the loop ends when
    every row has produced it, or after max_new_tokens steps. eos_id=None never stops early. n_tokens: only ids
    below it are sampled (a vocabulary padded past its tokenizer's size: the ids past it decode to nothing).
    """
    check_sampling_args(temperature, top_p, top_k)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    idx = prompt_batch(prompt_ids, eos_id, _device_of(model))               # (B, T)
    cache = KVCache() if use_cache else None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    for _ in range(max_new_tokens):
        # crop to the window and take the last position's logits (with or without the cache)
        logits, cache = next_logits(model, idx, cache)                      # (B, V)
        logits = logits[:, :n_tokens]                                       # (B, n_tokens); None keeps all
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
    if steps:
        new = torch.stack(steps, dim=1)                                     # (B, N)
    else:                                                                   # max_new_tokens == 0
        new = torch.empty(prompt_batch(prompt_ids, eos_id).size(0), 0, dtype=torch.long, device=_device_of(model))
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
        if token_id not in self.vocab:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocab (size {len(self.vocab)}): "
                             "the model's vocab_size is larger than its tokenizer's")
        return self._utf8.decode(self.vocab[token_id])

    def flush(self) -> str:
        """The end of the stream: an unfinished character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


# ----------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint: the model and the tokenizer from the checkpoint alone


def load_model(ckpt_path, device="cpu", tokenizer_dir=None, *, fast: bool = False, with_tokenizer: bool = True):
    """(model in eval mode, Tokenizer or None, the checkpoint dict) from a train.py checkpoint.

    The checkpoint carries everything: "model_config" rebuilds the architecture, "model" holds the weights,
    "tokenizer_dir" says where the tokenizer lives (tokenizer_dir overrides it; None in both = no tokenizer; see
    lib/checkpoints.checkpoint_tokenizer). It is read with torch.load(weights_only=True): tensors and plain values,
    so loading cannot run code. Every problem is a BadInputError (a ValueError) with one line saying what to do.
    fast=True (the CLI's choice) builds TransformerLM(fast=True) and the fast tokenizer: the same numbers, sooner.
    with_tokenizer=False: no tokenizer is read (None), for work on token ids only.
    """
    from lib import checkpoints  # reading checkpoint files: lib/checkpoints.py
    ckpt = checkpoints.read_checkpoint(ckpt_path)
    config = checkpoints.checkpoint_config(ckpt, ckpt_path)
    model = TransformerLM(**dataclasses.asdict(config), device=device, fast=fast)
    checkpoints.load_weights(model, ckpt, ckpt_path)
    model.eval()
    tokenizer = (checkpoints.checkpoint_tokenizer(ckpt, tokenizer_dir, config.vocab_size, fast=fast, src=ckpt_path)
                 if with_tokenizer else None)
    return model, tokenizer, ckpt


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: per-token loss and perplexity over a file


@torch.inference_mode()
def evaluate(model, ids, stride: int | None = None, batch_size: int = 16, *, fast: bool = False) -> tuple[float, int]:
    """(mean loss in nats per token, number of tokens scored) of model over the token sequence ids (N,).

    Every token after the first is scored exactly once. Windows of context_length tokens slide by `stride`; each
    scores only its last targets, those no earlier window scored, so (after the first window) every token is
    predicted from at least context_length - stride tokens of context. stride = context_length (the default) gives
    non-overlapping full windows: the same average over positions as the training loop's validation loss, computed
    by the same code (lib/evaluation.loss_over_windows, batch_size windows per forward). A smaller stride gives each
    token more context and a lower loss, at context_length/stride times the cost. fast: the fast cross-entropy.
    """
    from lib.evaluation import loss_over_windows  # the evaluator train.py's validation loss uses too
    ctx = model.config.context_length
    stride = ctx if stride is None else stride
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride must be in [1, context_length={ctx}], got {stride}")
    ids = ids if isinstance(ids, np.ndarray) else np.asarray(ids)        # a memmap stays a memmap
    n = len(ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score one prediction, got {n}")
    # Window ends (exclusive, in input positions): inputs ids[end-T:end] predict targets ids[end-T+1:end+1].
    ends = np.array(list(range(ctx, n - 1, stride)) + [n - 1] if n - 1 > ctx else [n - 1])
    window = min(ctx, int(ends[0]))             # all windows are full, except a lone one on a short file
    scored = np.diff(ends, prepend=0)           # (windows,) targets that no earlier window scored
    loss_sum, count = loss_over_windows(model, ids, ends - window, window, batch_size, _device_of(model),
                                        vocab_size=model.config.vocab_size, scored=scored, fast=fast)
    return loss_sum / count, count


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def prompt_ids_for(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts a new document (the end-of-text token), when the tokenizer has one."""
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        eot = tokenizer.special_token_ids.get(END_OF_TEXT)
        if eot is None:
            raise ValueError(f"empty prompt and the tokenizer has no {END_OF_TEXT} to start from: pass --prompt TEXT")
        prompt_ids = [eot]                                                  # "a new document starts here"
    return prompt_ids


def print_header(args, model, ckpt, device, prompt_ids, seed) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    print(f"# sample.py {args.ckpt} (iteration {ckpt.get('iteration', '?')}, {n_params / 1e6:.2f}M parameters, "
          f"context {model.config.context_length}) on {device}")
    print(f"# temperature {args.temperature} · top_p {args.top_p} · top_k {args.top_k or 'off'} · "
          f"max_new_tokens {args.max_new_tokens} · seed {seed} · num_samples {args.num_samples} · "
          f"kv cache {'off' if args.no_cache else 'on'}")
    print(f"# prompt: {args.prompt!r} ({len(prompt_ids)} token{'s' * (len(prompt_ids) != 1)}"
          f"{'' if args.prompt else ': ' + END_OF_TEXT})")


def stream_samples(args, model, tokenizer, prompt_ids, eos_id, generator) -> tuple[list[list[int]], list[bool]]:
    """Generate --num-samples continuations as one batch, printing the first as it comes; returns each sample's
    new ids (without the final EOS) and whether it ended at EOS."""
    batch = torch.tensor([prompt_ids] * args.num_samples)                   # (S, T): the same prompt S times
    new_ids = [[] for _ in range(args.num_samples)]
    ended = [False] * args.num_samples
    stream = TextStream(tokenizer.vocab)
    print(f"\n=== sample 1/{args.num_samples} ===")
    print(args.prompt, end="", flush=True)
    for step in generate_stream(model, batch, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                eos_id, generator, use_cache=not args.no_cache, n_tokens=tokenizer.vocab_size):
        for row, token in enumerate(step.tolist()):                         # .tolist() syncs: once per step
            if ended[row]:
                continue
            if token == eos_id:
                ended[row] = True
                continue
            new_ids[row].append(token)
            if row == 0:
                print(stream.push(token), end="", flush=True)
    print(stream.flush())
    return new_ids, ended


def print_samples(args, tokenizer, new_ids, ended, seconds) -> None:
    """The other samples (the first was streamed), how each ended, and the speed."""
    for row in range(args.num_samples):
        if row > 0:
            print(f"\n=== sample {row + 1}/{args.num_samples} ===")
            print(args.prompt + tokenizer.decode(new_ids[row]))
        how = f"stopped at {END_OF_TEXT}" if ended[row] else "reached --max-new-tokens"
        print(f"=== end of sample {row + 1}/{args.num_samples}: {len(new_ids[row])} new tokens, {how} ===")
    steps = max(len(ids) + ended[row] for row, ids in enumerate(new_ids))
    print(f"\n# {args.num_samples} x {steps} steps in {seconds:.2f} s: "
          f"{args.num_samples * steps / max(seconds, 1e-9):.1f} tokens/s")


def _sample(args, model, tokenizer, ckpt, device) -> None:
    """Sample --num-samples continuations as one batch; the first streams as it is generated."""
    if tokenizer is None:
        raise ValueError("the checkpoint names no tokenizer_dir: pass --tokenizer DIR")
    prompt_ids = prompt_ids_for(tokenizer, args.prompt)
    eos_id = None if args.no_stop_on_eos else tokenizer.special_token_ids.get(END_OF_TEXT)  # None: no such token
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)  # printed, so any run can be repeated
    generator = torch.Generator(device=device).manual_seed(seed)
    print_header(args, model, ckpt, device, prompt_ids, seed)
    start = time.perf_counter()
    new_ids, ended = stream_samples(args, model, tokenizer, prompt_ids, eos_id, generator)
    print_samples(args, tokenizer, new_ids, ended, time.perf_counter() - start)


def _evaluate_file(args, model, tokenizer, ckpt) -> None:
    """--eval FILE: the loss and perplexity of the model over a file's token ids."""
    from lib.evaluation import read_eval_ids
    path = Path(args.eval)
    ids = read_eval_ids(path, tokenizer)
    ctx = model.config.context_length
    stride = ctx if args.eval_stride is None else args.eval_stride
    print(f"# eval {path}: {len(ids):,} tokens · {args.ckpt} (iteration {ckpt.get('iteration', '?')}) · "
          f"windows of {ctx} tokens, stride {stride}")
    try:
        loss, n = evaluate(model, ids, stride=stride, fast=True)
    except ValueError as e:
        raise ValueError(f"--eval {path}: {e}") from None
    print(f"loss {loss:.4f} nats/token · perplexity {math.exp(loss):.3f} · {n:,} tokens scored")


def main(argv=None) -> None:
    parser = OneLineParser(prog="sample.py",
                     description="Sample text from a train.py checkpoint, or measure its loss on a file (--eval).")
    parser.add_argument("ckpt", help="checkpoint .pt written by train.py (carries the model config and tokenizer dir)")
    parser.add_argument("--prompt", default="", help=f"text to continue (default: empty = start after {END_OF_TEXT})")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (argmax)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]; 1 = off")
    parser.add_argument("--top-k", type=int, default=None, help="keep only the K most likely tokens (default off)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples generated together as one batch")
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed, printed in the header")
    parser.add_argument("--no-stop-on-eos", action="store_true", help=f"keep going past {END_OF_TEXT}")
    parser.add_argument("--no-cache", action="store_true", help="recompute the context every step (the reference)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (overrides the checkpoint's)")
    parser.add_argument("--eval", default=None, metavar="FILE",
                        help="report per-token loss and perplexity over FILE (.npy of ids, or text) instead")
    parser.add_argument("--eval-stride", type=int, default=None,
                        help="--eval window stride (default context_length: non-overlapping full windows)")
    args = parser.parse_args(argv)

    try:
        check_sampling_args(args.temperature, args.top_p, args.top_k)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        from lib.checkpoints import pick_device
        device = pick_device(args.device)
        # fast=True: TransformerLM's speed layer (lib/kernels.py) and the fast encoder, the same tokens sooner
        ids_only = args.eval is not None and Path(args.eval).suffix == ".npy" and args.tokenizer is None
        model, tokenizer, ckpt = load_model(args.ckpt, device, tokenizer_dir=args.tokenizer, fast=True,
                                            with_tokenizer=not ids_only)  # a .npy of ids needs no tokenizer
        if args.eval:
            _evaluate_file(args, model, tokenizer, ckpt)
        else:
            _sample(args, model, tokenizer, ckpt, device)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {e}\n")
    except (FloatingPointError, EnvironmentFault) as e:
        parser.exit(EXIT_ENVIRONMENT, f"{parser.prog}: error: {e}\n")
    except BrokenPipeError:  # the reader went away (`sample.py ... | head`): stop quietly, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # so the exit-time flush cannot fail
        sys.exit(1)
    except OSError as e:  # the machine's fault, not the input's (a file that cannot be read: permissions, I/O)
        where = f"cannot read {e.filename}: " if e.filename else ""
        parser.exit(EXIT_ENVIRONMENT, f"{parser.prog}: error: {where}{(e.strerror or str(e)).lower()}\n")


if __name__ == "__main__":
    from lib.cpu_tuning import tune_process
    tune_process()  # first: the CPU settings python train.py runs under (subnormals, freed memory kept)
    main()
