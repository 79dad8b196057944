"""lib/evaluation.py: the loss of a model over a set of windows of token ids, for train.py and sample.py.

One evaluator: train.py's validation loss (fixed windows, all ranks sharing them) and sample.py --eval (a file's
perplexity, windows sliding by a stride) both call `loss_over_windows`, so the two numbers are computed by the same
lines; `read_eval_ids` reads sample.py --eval's file. It sits here, not in train.py, and reads its windows with
lib/batches.py, so that sample.py --eval never loads train.py.
"""
import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from optim import cross_entropy
from lib.batches import batch_at


@torch.no_grad()
def loss_over_windows(model, data, starts, window: int, batch_size: int, device, autocast=contextlib.nullcontext(),
                      vocab_size=None, scored=None, rank: int = 0, world_size: int = 1,
                      fast: bool = False) -> tuple[float, int]:
    """(summed loss in nats, number of targets) over the windows data[s : s+window+1], s in starts, scored in
    batches of batch_size. scored[i] (default: all `window`) is how many of window i's last targets count: a
    sliding window with stride < window scores only the targets no earlier window scored (sample.py --eval).
    Ranks take every world_size-th batch and all-reduce the sums. fast: optim.cross_entropy's fast path."""
    loss_sum, count = torch.zeros((), device=device), 0  # the sum stays on the device: no sync per batch
    # Every rank runs the same number of forwards (FSDP's all-gathers need all of them): a rank past the end scores
    # a repeat of the first window with weight 0.
    rounds = -(-len(starts) // (batch_size * world_size))
    for i in range(rank * batch_size, rounds * batch_size * world_size, batch_size * world_size):
        chunk, weight = (starts[i:i + batch_size], 1) if i < len(starts) else (starts[:1], 0)
        x, y = batch_at(data, chunk, window, device, vocab_size)                 # (b, T), (b, T)
        with autocast:
            logits = model(x)                                                       # (b, T, V)
            if scored is None or (scored[i:i + batch_size] == window).all():
                n, loss = y.numel(), cross_entropy(logits, y, fast=fast)
            else:  # keep the last scored[r] targets of each row r
                first = torch.as_tensor(window - scored[i:i + batch_size], device=device)[:, None]  # (b, 1)
                keep = torch.arange(window, device=device)[None, :] >= first                    # (b, T)
                n = int(scored[i:i + batch_size].sum())
                loss = cross_entropy(logits[keep], y[keep], fast=fast)                     # (n, V), (n,)
        loss_sum += loss.float() * n * weight  # a mean over n targets back to their sum
        count += n * weight
    if world_size > 1:
        both = torch.stack([loss_sum, torch.tensor(float(count), device=device)])
        dist.all_reduce(both)
        loss_sum, count = both[0], int(both[1].item())
    return loss_sum.item(), count  # note: .item() waits for the device (fine: once per evaluation)


def read_eval_ids(path: Path, tokenizer) -> np.ndarray:
    """--eval FILE's token ids: a .npy of ids as it is (it needs no tokenizer), or text that the tokenizer encodes."""
    if not path.is_file():
        raise FileNotFoundError(f"--eval file {path} does not exist: pass a .npy of token ids (bpe.py encode) or a "
                                "text file")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, mmap_mode="r")                              # memmap: windows are read as needed
        except (ValueError, EOFError) as e:  # not a .npy file, a truncated one, or one of pickled objects
            raise ValueError(f"--eval {path} is not a readable .npy array of token ids ({type(e).__name__}: {e}): "
                             "write one with python bpe.py encode") from None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"--eval {path}: expected a 1-D array of integer token ids, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        return ids
    if tokenizer is None:
        raise ValueError(f"--eval {path} is text and the checkpoint names no tokenizer_dir: pass --tokenizer DIR "
                         "(or a .npy of token ids)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--eval {path} is not UTF-8 text ({e.reason} at byte {e.start}): pass UTF-8 text, or a "
                         ".npy of token ids") from None
    return np.array(tokenizer.encode(text), dtype=np.int64)
