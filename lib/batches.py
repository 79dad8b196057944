"""lib/batches.py: windows of a token-id array as (x, y) tensors on a device, for train.py and lib/evaluation.py.

Below the chapters (imports none): train.get_batch draws the random starts and hands them here; the validation
loss and sample.py --eval (lib/evaluation.py) read their fixed windows through the same function, so sample.py
never needs train.py. What it adds to the plain `data[s : s+T+1]` is what a reader can skip: the id check that
names the first bad id (data from another tokenizer), pinned memory for an asynchronous copy to a GPU, and a
one-line error for a device that is not there.
"""
import numpy as np
import torch

from lib.cli import BadInputError


def batch_at(data: np.ndarray, starts: np.ndarray, context_length: int, device, vocab_size: int | None = None):
    """The windows data[s : s+T+1] for each start s, split into inputs x = ids[:-1] and targets y = ids[1:].

    Returns two int64 tensors of shape (B, T) on `device`; y is x shifted left by one token."""
    idx = starts[:, None] + np.arange(context_length + 1)  # (B, T+1) positions
    window = data[idx]  # (B, T+1) fancy indexing on the memmap reads just these ids
    if vocab_size is not None:
        check_ids(window, starts, data, vocab_size)
    window = torch.from_numpy(window.astype(np.int64))
    try:
        if device.type == "cuda":
            # CUDA extra: page-locked host memory lets the copy run asynchronously (non_blocking) beside the GPU's work.
            window = window.pin_memory().to(device, non_blocking=True)
        else:
            window = window.to(device)
    except (RuntimeError, AssertionError) as e:  # a CPU-only torch raises AssertionError for "cuda"
        raise DeviceUnavailableError(f"cannot put a batch on device {device} ({str(e).splitlines()[0]}): pick an "
                                     f"available device, e.g. cpu") from None
    return window[:, :-1], window[:, 1:]  # x (B, T), y (B, T)


def check_ids(window: np.ndarray, starts: np.ndarray, data, vocab_size: int) -> None:
    """Every id of the (B, T+1) windows in [0, vocab_size), else a BadInputError naming the first bad id and where
    it is: data encoded by another tokenizer would otherwise index past the embedding table."""
    if not window.size or (int(window.max()) < vocab_size and int(window.min()) >= 0):
        return
    row, col = np.argwhere((window >= vocab_size) | (window < 0))[0]
    name = getattr(data, "filename", None) or "the data array"
    raise BadInputError(f"token id {int(window[row, col])} at position {int(starts[row]) + int(col)} of {name} is "
                        f"outside the model's vocabulary [0, {vocab_size}): the data was encoded with another "
                        f"tokenizer (use matching data, or the tokenizer's --vocab-size)")


class DeviceUnavailableError(RuntimeError):
    """A batch could not be moved to the requested device (no CUDA here, or no such GPU index). A RuntimeError,
    which is what torch raises there and what code written against the handout's get_batch expects."""
