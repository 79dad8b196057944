"""train.py: the training loop of a Transformer LM (CS336 assignment 1, §5 "Training loop" and §7 "Experiments").

Random windows from a memory-mapped array of token ids (`get_batch`), the model from model.py, AdamW, the cosine
schedule and gradient clipping from optim.py, evaluation on a fixed set of validation windows, a JSONL log,
atomic checkpoints with exact resume (and a clean stop, never a torn file, when the disk fills), the CUDA extras
(bf16 or fp16 autocast with a loss scaler, TF32, pinned memory, torch.compile), activation checkpointing, and
DistributedDataParallel or FSDP2 sharding under torchrun. With no arguments it runs an offline demo of the whole
stack.

Layers (each imports only from those before it): cli -> bpe -> model, optim -> accounting -> train -> sample. This file
uses bpe (tokenizer directories), model, optim and accounting (the MFU formula and peaks); sample.py builds on its
checkpoint reader, device picker and evaluator. The demo's last step, sampling, is the one import of sample.py here.

    python train.py                                        # offline demo: BPE, encode, train, sample (~1 min on CPU)
    python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m
    torchrun --nproc_per_node 8 train.py --data data/owt --preset ts17m --batch-size 256 --compile
    torchrun --nproc_per_node 8 train.py --data data/owt --d-model 1024 --num-layers 24 --num-heads 16 --d-ff 4096 \
        --context-length 1024 --batch-size 256 --fsdp --activation-checkpointing   # a GPT-2 medium-size model, sharded
    python train.py --resume runs/ts17m                    # continue exactly where it stopped (Ctrl-C saves first)
    python train.py plot runs/a runs/b -o curves.png       # loss vs step and vs wall time
    python train.py export runs/ts17m/best.pt --out hf/ts17m   # a Hugging Face Llama directory (and `import` back)
"""
import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import accounting
import bpe
from lib import cli
from lib.cli import (EXIT_BAD_INPUT, EXIT_ENVIRONMENT, BadInputError, EnvironmentFault, OneLineParser, WriteFault,
                 QUOTED_ERROR_CHARS, atomic_file, atomic_write_text, describe_fault, error_summary, space_problem)
from model import ATTN_IMPLS, FFNS, NORMS, POSITIONS, PRESETS, ModelConfig, TransformerLM
from model import from_hf_llama_config, from_hf_llama_state_dict, to_hf_llama_config, to_hf_llama_state_dict
from optim import AdamW, clip_divisor, cosine_lr, cross_entropy


# ---------------------------------------------------------------------------------------------------------------
# Data: token ids on disk -> (x, y) batches
# ---------------------------------------------------------------------------------------------------------------
# A dataset is a 1-D array of token ids saved by bpe.encode_file (np.save format, uint16, or uint32 for vocabularies
# over 65,536). np.load(mmap_mode="r") maps the file without reading it: only the pages under the sampled windows
# are ever read, so a 5 GB OpenWebText file costs no RAM and no start-up time. For the same reason nothing here
# scans the whole file: token ids are checked against vocab_size on every batch, which costs B*(T+1) comparisons.

TOKEN_DTYPES = (np.uint16, np.uint32)


def load_tokens(path) -> np.ndarray:
    """Memory-map a .npy of token ids, checking only what is cheap: it exists, is 1-D and has an id dtype."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"data file {path} does not exist (make one with `python bpe.py prepare tinystories`)")
    try:
        data = np.load(path, mmap_mode="r")
    except Exception as e:  # a truncated or non-.npy file: say which, not numpy's traceback
        raise BadInputError(f"{path} is not a readable .npy array of token ids ({e})") from None
    if data.ndim != 1 or data.dtype not in TOKEN_DTYPES:
        raise BadInputError(f"{path} holds a {data.dtype} array of shape {data.shape}; expected 1-D uint16 or uint32 "
                            f"token ids as written by bpe.encode_file")
    return data


class DeviceUnavailableError(RuntimeError):
    """A batch could not be moved to the requested device (no CUDA here, or no such GPU index). A RuntimeError,
    which is what torch raises there and what code written against the handout's get_batch expects."""


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


def get_batch(data, batch_size: int, context_length: int, device, generator: torch.Generator | None = None, *,
              vocab_size: int | None = None, rank: int = 0, world_size: int = 1):
    """batch_size random windows of context_length + 1 ids from `data` -> (x, y), each (batch_size, context_length).

    Start offsets are uniform over every valid position. With world_size > 1 (DDP) every rank draws the same
    batch_size * world_size offsets from an identically seeded generator and keeps its own slice, so the global
    batch is exactly the one a single process would draw (and the ranks never read the same window).
    An unavailable device raises DeviceUnavailableError (a RuntimeError) from the copy itself: nothing is checked
    per batch that the copy does not check anyway."""
    if len(data) <= context_length:
        raise BadInputError(f"data has {len(data)} tokens, fewer than context_length + 1 = {context_length + 1}")
    # Valid starts are 0 .. len - T - 1, so the target of the last input (position s + T) is still in the data.
    starts = torch.randint(len(data) - context_length, (batch_size * world_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].numpy()
    return batch_at(data, starts, context_length, torch.device(device), vocab_size)


def eval_starts(n_tokens: int, context_length: int, n_windows: int) -> np.ndarray:
    """The fixed validation windows: all of the split (back to back) when it is small, else n_windows offsets
    drawn from a generator seeded with 0, independent of --seed, so every run's val loss measures the same text."""
    n_all = (n_tokens - 1) // context_length
    if n_all <= n_windows:
        return np.arange(n_all) * context_length
    g = torch.Generator().manual_seed(0)
    return torch.randint(n_tokens - context_length, (n_windows,), generator=g).numpy()


def find_data(data_arg, val_arg):
    """--data FILE.npy or a `bpe.py prepare` directory -> (train path, val path or None, tokenizer dir or None).

    Only paths: nothing is opened yet. A tokenizer directory is one holding vocab.json (the data directory itself,
    or the directory of the .npy file)."""
    data_path = Path(data_arg)
    if data_path.is_dir():
        if val_arg is None and (data_path / "valid.npy").is_file():
            val_arg = data_path / "valid.npy"
        tokenizer_dir, data_path = data_path, data_path / "train.npy"
    else:
        tokenizer_dir = data_path.parent
    return data_path, val_arg, (tokenizer_dir if (tokenizer_dir / "vocab.json").is_file() else None)


HELD_OUT_FRACTION = 0.1  # of the training file, when no validation data is given


def open_data(train_path, val_path, context_length):
    """Memory-map the splits; without validation data the last 10% of the training file is held out (a view)."""
    train = load_tokens(train_path)
    if val_path is not None:
        val = load_tokens(val_path)
    else:
        cut = int(len(train) * (1 - HELD_OUT_FRACTION))
        train, val = train[:cut], train[cut:]
    for name, split in (("training", train), ("validation", val)):
        if len(split) <= context_length:
            raise BadInputError(f"{name} data {split.filename} has {len(split)} tokens, fewer than "
                                f"context_length + 1 = {context_length + 1}: use more data or a smaller "
                                f"--context-length")
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads
# ---------------------------------------------------------------------------------------------------------------
# A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so it loads with
# torch.load(weights_only=True) and sample.py can rebuild model and tokenizer from it alone:
#   model (state dict), optimizer (state dict), iteration (optimizer steps done), model_config (asdict(ModelConfig)),
#   tokenizer_dir (str or None), and for exact resume: train_args (the resolved flags), rng (RNG states) and
#   progress (the loop's bookkeeping, Progress.state_dict()). `read_checkpoint` is the one place a checkpoint is
#   read from disk; train.py's resume, sample.py and the tests all go through it.


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The TransformerLM under DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers, whose
    state dicts would otherwise carry "module." / "_orig_mod." key prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(model, optimizer, iteration: int, out, *, tokenizer_dir: str | None = None, **extra) -> None:
    """Write model + optimizer state and `extra` values to `out` (a path or a binary file object).

    A path is written with cli.atomic_file: to out.tmp, flushed to disk, then os.replace()d over `out`, so a crash
    mid-write leaves the previous checkpoint intact, never a torn one. A checkpoint that will not fit on the disk is
    refused before any byte is written; any failure (a full disk, an I/O error, a second Ctrl-C) removes out.tmp and
    raises cli.WriteFault naming the file and the cause."""
    model = unwrap(model)
    write_checkpoint_file(checkpoint_dict(model.state_dict(), optimizer.state_dict() if optimizer is not None else None,
                                          iteration, getattr(model, "config", None), tokenizer_dir, **extra), out)


def checkpoint_dict(model_state: dict, optimizer_state: dict | None, iteration: int, model_config=None,
                    tokenizer_dir: str | None = None, **extra) -> dict:
    """What a checkpoint holds (see the banner): state dicts, the iteration, model config, tokenizer and `extra`."""
    ckpt = {"model": model_state, "optimizer": optimizer_state, "iteration": int(iteration),
            "tokenizer_dir": tokenizer_dir}
    if model_config is not None:
        ckpt["model_config"] = dataclasses.asdict(model_config)
    return ckpt | extra


def write_checkpoint_file(ckpt: dict, out) -> None:
    if not isinstance(out, (str, os.PathLike)):
        torch.save(ckpt, out)
        return
    with atomic_file(out, needed=checkpoint_bytes(ckpt)) as f:
        torch.save(ckpt, f)


def checkpoint_bytes(ckpt) -> int:
    """A slight overestimate of torch.save's file size: every tensor storage once (tied weights share one), plus
    the zip format's per-tensor alignment and headers and the pickled structure (~0.3% measured on the demo model)."""
    storages: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(ckpt)
    return checkpoint_file_bytes(sum(storages.values()), len(storages))


def checkpoint_file_bytes(tensor_bytes: int, n_tensors: int) -> int:
    """torch.save's file size, slightly over: the tensors' bytes plus the per-tensor and fixed overheads."""
    return tensor_bytes + CHECKPOINT_BYTES_PER_TENSOR * n_tensors + CHECKPOINT_BYTES_FIXED


CHECKPOINT_BYTES_PER_TENSOR = 4096    # zip entry header + 64-byte alignment + pickle record, rounded well up
CHECKPOINT_BYTES_FIXED = 1 << 16      # the pickled dict itself (train_args, rng states, ...)


def load_weights_only(src):
    """The one torch.load of the project: onto the CPU, weights_only=True (tensors and plain values only, so loading
    a file cannot run code), for checkpoints and for a Hugging Face pytorch_model.bin alike."""
    return torch.load(src, map_location="cpu", weights_only=True)


def read_checkpoint(src) -> dict:
    """torch.load(weights_only=True) onto the CPU, with a one-line BadInputError for a missing or corrupt file, or
    one that is not a checkpoint of this project (it needs at least "model" and "iteration")."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise BadInputError(f"checkpoint {src} does not exist: pass a .pt file train.py wrote (e.g. RUN/last.pt)")
    try:
        ckpt = load_weights_only(src)
    except Exception as e:  # truncated, not a torch file, or a pickle that is more than tensors and plain values
        raise BadInputError(f"checkpoint {src} is corrupt or not a train.py checkpoint ({error_summary(e)}); "
                            f"try best.pt beside it") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "iteration" not in ckpt:
        raise BadInputError(f"checkpoint {src} is not a train.py checkpoint (no 'model'/'iteration' entries)")
    return ckpt


def checkpoint_config(ckpt: dict, src) -> ModelConfig:
    """The ModelConfig a checkpoint's weights were made with, or a BadInputError saying why there is none."""
    if "model_config" not in ckpt:
        raise BadInputError(f"checkpoint {src} has no 'model_config' entry: not written by train.py")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise BadInputError(f"checkpoint {src}: model_config has unknown fields {unknown}; was it written by a newer "
                            f"model.py?")
    return ModelConfig(**ckpt["model_config"])


def checkpoint_tokenizer(ckpt: dict, tokenizer_dir, vocab_size: int) -> bpe.Tokenizer | None:
    """--tokenizer DIR, else the directory the checkpoint names, else None (the model then works on ids only).
    sample.py and train.py export read a checkpoint's tokenizer through here."""
    source = "the tokenizer_dir argument (--tokenizer)" if tokenizer_dir is not None else "the checkpoint"
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else ckpt.get("tokenizer_dir")
    if tokenizer_dir is None:
        return None
    tok_path = Path(tokenizer_dir)
    if not ((tok_path / "vocab.json").is_file() and (tok_path / "merges.txt").is_file()):
        raise BadInputError(f"tokenizer directory {tok_path} (named by {source}) has no vocab.json and "
                            "merges.txt: pass --tokenizer DIR (a directory bpe.py train/prepare wrote)")
    tokenizer = bpe.Tokenizer.from_dir(tok_path)
    if tokenizer.vocab_size > vocab_size:
        raise BadInputError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model only "
                            f"{vocab_size}: wrong --tokenizer for this checkpoint?")
    return tokenizer


def load_checkpoint(src, model, optimizer=None, *, name=None) -> int:
    """Restore model (and optimizer) state from `src` (path, file object or an already-loaded dict, whose file
    `name` gives); returns the iteration it was saved at. Weights that do not fit the model are a BadInputError
    naming the first mismatch."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        where = name if isinstance(src, dict) else src
        raise BadInputError(f"checkpoint {where}: weights do not match the model "
                            f"({str(e).strip().splitlines()[-1].strip()[:QUOTED_ERROR_CHARS]})") from None
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["iteration"])


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a run draws from, as tensors and plain values (numpy's uint32 key as an int64 tensor)."""
    np_name, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_name, torch.from_numpy(np_key.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
            "python": random.getstate(),
            "batches": generator.get_state()}  # the get_batch stream: which windows come next


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_name, np_key, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_key.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    random.setstate(state["python"])
    generator.set_state(state["batches"])


# ---------------------------------------------------------------------------------------------------------------
# Configuration: flags, --config JSON, presets, resume
# ---------------------------------------------------------------------------------------------------------------
# Every flag has one resolved value, taken from the first of: the command line, --config FILE.json, the checkpoint
# being resumed, DEFAULTS. The model's shape is a ModelConfig: a preset (or ModelConfig's defaults, the handout's
# 17M TinyStories model) with any model flag given replacing its field; vocab_size comes from --vocab-size, else the
# tokenizer beside the data, else the preset. On --resume the model is the checkpoint's; model flags must agree.

MODEL_FLAGS = [f.name for f in dataclasses.fields(ModelConfig)]  # vocab_size, context_length, d_model, ...

DEFAULTS = dict(
    data=None, val_data=None, tokenizer=None, preset=None, **{name: None for name in MODEL_FLAGS},
    batch_size=32, grad_accum=1, max_iters=5000, lr=1e-3, min_lr=1e-4, warmup_iters=100, cosine_cycle_iters=None,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=500, eval_iters=20, log_interval=10,
    ckpt_interval=500, seed=0, device=None, dtype=None, compile=False, activation_checkpointing=False, fsdp=False,
    peak_flops=None, out=None, overwrite=False, init_from=None, wandb=None, wandb_run=None,
)


def build_parser() -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: the namespace holds only the flags actually given, the top layer of resolution.
    p = OneLineParser(prog="train.py", description=__doc__, argument_default=argparse.SUPPRESS,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data").add_argument
    a("--data", help="a .npy of token ids, or a `bpe.py prepare` directory (train.npy, valid.npy, tokenizer)")
    a("--val-data", help="validation .npy (default: DIR/valid.npy, else the last 10%% of --data)")
    a("--tokenizer", help="tokenizer directory recorded in checkpoints (default: the one beside the data)")
    a = p.add_argument_group("model (handout names; a preset plus any field overridden)").add_argument
    a("--preset", help=f"one of {', '.join(PRESETS)} (default: ModelConfig's defaults)")
    a("--vocab-size", type=int)
    a("--context-length", type=int)
    a("--d-model", type=int)
    a("--num-layers", type=int)
    a("--num-heads", type=int)
    a("--d-ff", type=int, help="FFN width (SwiGLU default from the preset; SiLU default 4*d_model)")
    a("--rope-theta", type=float)
    a("--norm", choices=NORMS, help="ablation: RMSNorm placement")
    a("--position", choices=POSITIONS, help="ablation: RoPE or no position embedding")
    a("--ffn", choices=FFNS, help="ablation: gated SwiGLU or plain SiLU FFN")
    a("--tie-embeddings", action=argparse.BooleanOptionalAction, help="share token embedding and lm_head")
    a("--attn-impl", choices=ATTN_IMPLS, help="fused torch SDPA or the from-scratch reference")
    a = p.add_argument_group("optimisation").add_argument
    a("--batch-size", type=int, help="sequences per optimizer step, summed over accumulation steps and ranks")
    a("--grad-accum", type=int, help="micro-batches per optimizer step")
    a("--max-iters", type=int, help="optimizer steps")
    a("--lr", type=float, help="peak learning rate")
    a("--min-lr", type=float, help="learning rate at the end of the cosine")
    a("--warmup-iters", type=int)
    a("--cosine-cycle-iters", type=int, help="step where the cosine reaches --min-lr (default --max-iters)")
    a("--weight-decay", type=float)
    a("--beta1", type=float)
    a("--beta2", type=float)
    a("--grad-clip", type=float, help="max global gradient L2 norm (0 = no clipping)")
    a("--seed", type=int)
    a = p.add_argument_group("evaluation, logging, checkpoints").add_argument
    a("--eval-interval", type=int)
    a("--eval-iters", type=int, help="validation batches per evaluation (a fixed set of windows)")
    a("--log-interval", type=int)
    a("--ckpt-interval", type=int)
    a("--out", help="run directory (default runs/<date-time>)")
    a("--wandb", metavar="PROJECT", help="also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works)")
    a("--wandb-run", metavar="NAME", help="the W&B run's name (default: W&B picks one)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    a("--init-from", metavar="CKPT", help="a new run that starts from CKPT's weights (fresh optimizer, schedule and "
                                          "step; the model config is CKPT's), e.g. to fine-tune an imported model")
    a("--overwrite", action=argparse.BooleanOptionalAction, help="start afresh in an --out that has a checkpoint")
    a("--config", metavar="FILE.json", help="defaults for any flag (keys are flag names); command line wins")
    a = p.add_argument_group("hardware").add_argument
    a("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    a("--dtype", choices=list(AUTOCAST_DTYPES) + ["fp32"],
      help="autocast precision (default: bf16 on a GPU with native bf16, fp16 on one without, fp32 on CPU)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction,
      help="recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more compute)")
    a("--fsdp", action=argparse.BooleanOptionalAction,
      help="under torchrun: shard parameters, gradients and AdamW state over the ranks (FSDP2) instead of DDP")
    a("--peak-flops", type=float, help="MFU denominator in FLOP/s per device (default: published GPU peak, or a "
                                       "measured matmul on CPU; 0 = no MFU)")
    for action in p._actions:  # show DEFAULTS in --help (the parser itself has none: see argument_default)
        if DEFAULTS.get(action.dest) not in (None, False):
            action.help = f"{action.help + ' ' if action.help else ''}(default {DEFAULTS[action.dest]})"
    return p


def read_config_file(path, parser) -> dict:
    """--config FILE.json: a flat JSON object of flag names ("d_model" or "d-model") to values; never executed."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"--config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"--config file {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BadInputError(f"--config file {path} must hold a JSON object of flag names to values")
    types = {action.dest: action.type for action in parser._actions}
    choices = {action.dest: action.choices for action in parser._actions if action.choices}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS:
            raise BadInputError(f"--config {path}: unknown key {key!r} (keys are flag names such as 'd_model')")
        if value is not None and types.get(name) in (int, float) and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or (types[name] is int and value != int(value))):
            raise BadInputError(f"--config {path}: {key} must be {'an integer' if types[name] is int else 'a number'}")
        if name in choices and value not in choices[name]:
            raise BadInputError(f"--config {path}: {key} must be one of {', '.join(choices[name])}, got {value!r}")
        out[name] = value
    return out


def resolve_args(argv) -> tuple[dict, dict | None]:
    """Flags -> (resolved args, checkpoint being resumed or None)."""
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    config = read_config_file(cli["config"], parser) if "config" in cli else {}
    given = {**config, **cli}  # command line wins over the JSON file
    given.pop("config", None)
    ckpt = None
    if given.get("resume"):
        run_dir = Path(given["resume"])
        if given.get("init_from"):
            raise BadInputError("--init-from starts a new run and --resume continues one: give only one of them")
        if not (run_dir / "last.pt").is_file():
            raise BadInputError(f"--resume {run_dir}: no checkpoint {run_dir / 'last.pt'} to resume from")
        ckpt = read_checkpoint(run_dir / "last.pt")
        if "rng" not in ckpt:  # e.g. one that train.py import wrote
            raise BadInputError(f"--resume {run_dir}: {run_dir / 'last.pt'} holds weights but no training state; "
                                f"start a new run from it with --init-from {run_dir / 'last.pt'}")
        base = {k: v for k, v in ckpt.get("train_args", {}).items() if k in DEFAULTS and k not in MODEL_FLAGS}
        base["preset"] = None
        args = {**DEFAULTS, **base, **given, "out": str(run_dir)}
    else:
        args = {**DEFAULTS, **given}
    args.pop("resume", None)
    return args, ckpt


def resolve_model_config(args: dict, ckpt: dict | None, tokenizer_dir, init: dict | None = None) -> ModelConfig:
    """Preset (or ModelConfig()) + model flags; a resumed run must match its checkpoint's config, and an
    --init-from run (`init`, the checkpoint it starts from) that checkpoint's."""
    if args["preset"] is not None and args["preset"] not in PRESETS:
        raise BadInputError(f"unknown preset {args['preset']!r}: choose one of {', '.join(PRESETS)}")
    source = ckpt if ckpt is not None else init  # the checkpoint whose model this run continues, if any
    where = f"{args['out']}/last.pt" if ckpt is not None else args["init_from"]
    if source is not None:
        base = checkpoint_config(source, where)
        if args["preset"] is not None:  # an explicit preset must agree with the checkpoint (vocab aside)
            base = dataclasses.replace(PRESETS[args["preset"]], vocab_size=base.vocab_size)
    else:
        base = PRESETS[args["preset"]] if args["preset"] else ModelConfig()
        if args["vocab_size"] is None and tokenizer_dir is not None:
            base = dataclasses.replace(base, vocab_size=bpe.Tokenizer.from_dir(tokenizer_dir).vocab_size)
    try:
        cfg = base.with_overrides(**{name: args[name] for name in MODEL_FLAGS})
    except ValueError as e:
        raise BadInputError(str(e)) from None
    if source is not None and dataclasses.asdict(cfg) != source["model_config"]:
        diff = ", ".join(f"{k} {v} vs {getattr(cfg, k)}" for k, v in source["model_config"].items()
                         if getattr(cfg, k) != v)
        hint = ("resume without model flags, or start a new --out" if ckpt is not None else
                "a run from --init-from has that checkpoint's model: drop the model flags")
        raise BadInputError(f"checkpoint {where} has a different model config ({diff}): {hint}")
    return cfg


def check_args(args: dict, world_size: int) -> None:
    """The inconsistent-flag errors that would otherwise surface as shape errors deep inside the loop."""
    for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                 "ckpt_interval"):
        if args[name] < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {args[name]}")
    if args["batch_size"] % (args["grad_accum"] * world_size):
        raise BadInputError(f"--batch-size {args['batch_size']} is not divisible by --grad-accum {args['grad_accum']}"
                            + (f" x {world_size} ranks" if world_size > 1 else ""))
    cycle = args["cosine_cycle_iters"] or args["max_iters"]
    if args["warmup_iters"] < 0 or cycle < args["warmup_iters"]:
        raise BadInputError(f"--warmup-iters {args['warmup_iters']} must be <= the cosine cycle ({cycle} steps)")
    if args["grad_clip"] < 0:
        raise BadInputError(f"--grad-clip must be >= 0 (0 = no clipping), got {args['grad_clip']}")
    if not args["lr"] > 0 or args["min_lr"] < 0 or args["min_lr"] > args["lr"]:
        raise BadInputError(f"need 0 <= --min-lr ({args['min_lr']}) <= --lr ({args['lr']}) and --lr > 0")
    if args["fsdp"] and "LOCAL_RANK" not in os.environ:
        raise BadInputError("--fsdp shards over the processes torchrun starts: run it as `torchrun --nproc_per_node N "
                            "train.py ... --fsdp` (or pass --no-fsdp, e.g. to resume an FSDP run in one process)")
    if args["wandb_run"] is not None and args["wandb"] is None:
        raise BadInputError("--wandb-run names a run of --wandb PROJECT: give --wandb too")
    if args["wandb"] is not None:
        cli.optional_import("wandb", "wandb", "--wandb")  # a missing package fails now, before any work
    if args["data"] is None:
        raise BadInputError("--data is required: a .npy of token ids or a `bpe.py prepare` directory "
                            "(or run `python train.py` with no arguments for the offline demo)")


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """--device, else the best available: cuda -> mps -> cpu. Under torchrun each rank takes cuda:LOCAL_RANK.
    The one device picker: sample.py uses it too."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"--device {name!r} is not a device name (try cuda, cuda:0, mps or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name} but CUDA is not available here (torch {torch.__version__}): "
                            f"use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BadInputError(f"--device {name} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                            f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"--device {name} but MPS is not available here: use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype -> the autocast dtype (fp32: none)


def pick_dtype(name: str | None, device: torch.device) -> tuple[str, str]:
    """(--dtype, why): the flag if given, else bf16 where the GPU has it natively, fp16 on a GPU without it (T4,
    V100: their bf16 is emulated, several times slower), fp32 on CPU and MPS (a CPU gains little from autocast)."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "bf16" and device.type == "cuda" and not native_bf16:
        raise BadInputError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16 (torch would "
                            f"emulate it, several times slower): use --dtype fp16")
    if name is not None:
        return name, "--dtype"
    if device.type == "cuda":
        return ("bf16", "automatic: this GPU has native bf16") if native_bf16 else (
            "fp16", "automatic: this GPU has no native bf16, so fp16 autocast with a GradScaler")
    return "fp32", f"automatic: on {device.type} 16-bit autocast gains little; --dtype bf16 or fp16 to try it"


def peak_flops(args, device, world_size) -> float | None:
    """MFU denominator (FLOP/s, all ranks): --peak-flops, a published GPU peak, else a measured CPU matmul peak."""
    if args["peak_flops"] is not None:
        return args["peak_flops"] * world_size or None
    if device.type == "cuda":  # the datasheet figure for this GPU's name (fp32 matmuls run as TF32 here)
        peak = accounting.gpu_peak_flops(torch.cuda.get_device_name(device), args["dtype"])
        return peak * world_size if peak else None
    if device.type == "cpu":  # measured once (about a second); note: shared cores make this, and so MFU, noisy
        dtype = AUTOCAST_DTYPES.get(args["dtype"], torch.float32)
        return accounting.measure_matmul_flops(device="cpu", dtype=dtype) * world_size
    return None


# ---------------------------------------------------------------------------------------------------------------
# A run: what stays fixed (Run), the objects a step uses (Trainer), the bookkeeping it changes (Progress)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything about a run that is fixed once it starts."""
    args: dict                  # every resolved flag, model fields included (config.json; a copy of the caller's)
    cfg: ModelConfig
    device: torch.device
    rank: int                   # this process among world_size (torchrun); 0 of 1 for a plain `python train.py`
    world_size: int
    out: Path                   # the run directory
    train_data: np.ndarray      # memmaps
    val_data: np.ndarray
    val_starts: np.ndarray      # the fixed validation windows (eval_starts)
    micro_batch: int            # sequences per rank per forward: batch_size / (grad_accum * world_size)
    autocast: torch.autocast    # 16-bit matmuls for --dtype bf16/fp16 (a no-op for fp32, and under FSDP)
    peak: float | None          # MFU denominator, FLOP/s over all ranks (rank 0 only; None = no MFU)

    @property
    def master(self) -> bool:
        return self.rank == 0  # rank 0 writes the run directory and prints

    @property
    def tokens_per_step(self) -> int:
        return self.args["batch_size"] * self.cfg.context_length

    def lr_at(self, it: int) -> float:
        a = self.args
        return cosine_lr(it, a["lr"], a["min_lr"], a["warmup_iters"], a["cosine_cycle_iters"] or a["max_iters"])


@dataclasses.dataclass
class Trainer:
    """The objects one training step uses."""
    model: TransformerLM        # the bare model: its parameters, its state dict
    forward: torch.nn.Module    # the model, compiled with --compile: evaluation runs this
    train: torch.nn.Module      # forward, wrapped in DDP under torchrun: training runs this
    optimizer: AdamW
    batches: torch.Generator    # the get_batch stream (same seed on every rank: see get_batch)
    scaler: torch.amp.GradScaler  # fp16 loss scaling (a no-op unless --dtype fp16)


@dataclasses.dataclass
class Progress:
    """The bookkeeping that several steps of the loop change, in one place. The fields in CHECKPOINTED are saved
    as one entry ("progress", plain numbers); the others belong to the running process."""
    step: int = 0                       # optimizer updates done
    best_val_loss: float = math.inf     # best.pt holds the model that had it
    elapsed: float = 0.0                # training seconds before this process started
    last_log_step: int = 0
    last_saved_step: int = 0            # of last.pt; 0 = none yet
    loss_sum: float | torch.Tensor = 0.0  # train loss summed over the steps since last_log_step (a device tensor
    #                                       while training: adding to it never waits for the GPU)
    skipped_steps: int | torch.Tensor = 0  # fp16: updates the GradScaler skipped (inf/nan gradients), a device count
    started: float = 0.0                # time.time() when this process started training
    last_log_time: float = 0.0          # ms/step and tokens/s are measured from here
    nonfinite: torch.Tensor | None = None  # device flag: a loss was nan/inf since the last check
    checkpoint_size: int = 0            # bytes the next checkpoint needs (the last one's size, or an estimate)
    space_warned: bool = False          # the "next checkpoint will not fit" warning is given once

    CHECKPOINTED = ("step", "best_val_loss", "elapsed", "last_log_step", "last_saved_step", "loss_sum",
                    "skipped_steps")

    def begin(self, device: torch.device) -> "Progress":
        """Start the clocks and put the loss accumulators on the device."""
        self.loss_sum = torch.full((), float(self.loss_sum), device=device)
        self.skipped_steps = torch.full((), int(self.skipped_steps), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.started = self.last_log_time = time.time()
        return self

    def seconds(self) -> float:
        """Training time so far, over every process of the run (resumes add up)."""
        return self.elapsed + time.time() - self.started

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)

    def state_dict(self) -> dict:
        # note: float(loss_sum) reads the tensor back (a sync); only at checkpoints
        return {"step": self.step, "best_val_loss": self.best_val_loss, "elapsed": self.seconds(),
                "last_log_step": self.last_log_step, "last_saved_step": self.last_saved_step,
                "loss_sum": float(self.loss_sum), "skipped_steps": int(self.skipped_steps)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "Progress":
        if "progress" in ckpt:
            return cls(**{k: ckpt["progress"][k] for k in cls.CHECKPOINTED if k in ckpt["progress"]})
        # checkpoints written before the "progress" entry kept these three entries instead
        loss_sum, last_log_step = ckpt["pending_loss"]
        return cls(step=int(ckpt["iteration"]), best_val_loss=ckpt["best_val_loss"], elapsed=ckpt["elapsed"],
                   last_log_step=last_log_step, last_saved_step=int(ckpt["iteration"]), loss_sum=loss_sum)


# ---------------------------------------------------------------------------------------------------------------
# Setting a run up: processes and device, data, the run directory, model and optimizer
# ---------------------------------------------------------------------------------------------------------------


def process_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size): torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain python is 0, 0, 1."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def setup_run(given: dict, ckpt: dict | None) -> tuple[Run, dict | None]:
    """Resolved flags -> (a Run: checks, device, data, model config, run directory name, process group; the
    checkpoint --init-from starts from, or None). ckpt: the checkpoint being resumed."""
    args = dict(given)  # filled in below (dtype, model fields, tokenizer, out); the caller's dict stays as it was
    rank, local_rank, world_size = process_ranks()
    check_args(args, world_size)
    device = pick_device(args["device"], local_rank)
    args["dtype"], dtype_reason = pick_dtype(args["dtype"], device)
    train_path, val_path, found_tokenizer = find_data(args["data"], args["val_data"])
    init = read_checkpoint(args["init_from"]) if ckpt is None and args["init_from"] else None
    args["tokenizer"] = args["tokenizer"] or (init_tokenizer(init, found_tokenizer, args["init_from"]) if init else
                                              str(found_tokenizer.resolve()) if found_tokenizer else None)
    cfg = resolve_model_config(args, ckpt, args["tokenizer"], init)
    args.update({name: getattr(cfg, name) for name in MODEL_FLAGS})
    train_data, val_data = open_data(train_path, val_path, cfg.context_length)
    out = Path(args["out"] or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    args["out"] = str(out)
    if ckpt is None and (out / "last.pt").exists() and not args["overwrite"]:
        raise BadInputError(f"{out} already holds a checkpoint: continue it with --resume {out}, or pass "
                            f"--overwrite / a new --out")
    micro = args["batch_size"] // (args["grad_accum"] * world_size)
    val_starts = eval_starts(len(val_data), cfg.context_length, args["eval_iters"] * micro * world_size)
    if world_size > 1 or args["fsdp"]:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # CUDA extra: TF32 tensor cores for the fp32 matmuls
    # CUDA extra (and CPU with --dtype bf16/fp16): matmuls in 16 bits, reductions and weights stay fp32.
    # (Under FSDP the MixedPrecisionPolicy casts instead: see shard_model.)
    autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(args["dtype"]),
                              enabled=args["dtype"] in AUTOCAST_DTYPES and not args["fsdp"])
    peak = peak_flops(args, device, world_size) if rank == 0 else None
    if rank == 0:
        print(f"precision: {args['dtype']} ({dtype_reason})")
    run = Run(args, cfg, device, rank, world_size, out, train_data, val_data, val_starts, micro, autocast, peak)
    return run, init


def init_tokenizer(init: dict, found: Path | None, src) -> str | None:
    """An --init-from run's tokenizer: the checkpoint's (its model's ids), which a tokenizer found beside the data
    must equal, or the data's ids would mean other tokens to the model."""
    theirs = init.get("tokenizer_dir")
    if theirs is None or not Path(theirs).is_dir():
        return str(found.resolve()) if found else None
    if found is not None:
        a, b = bpe.Tokenizer.from_dir(theirs), bpe.Tokenizer.from_dir(found)
        if (a.vocab, a.merges, a.special_tokens) != (b.vocab, b.merges, b.special_tokens):
            raise BadInputError(f"--init-from {src}: its tokenizer {theirs} is not the one beside the data ({found}); "
                                f"encode the data with it: python bpe.py encode --tokenizer {theirs} ...")
    return theirs


def build_trainer(run: Run, ckpt: dict | None, init: dict | None = None) -> tuple[Trainer, Progress]:
    """Model, optimizer, batch stream and loss scaler, with the checkpoint's state over them when resuming
    (--init-from: that checkpoint's weights alone, for a new run that starts from them)."""
    args = run.args
    torch.manual_seed(args["seed"])
    model = TransformerLM(**dataclasses.asdict(run.cfg), device=run.device)
    model.checkpoint_blocks = args["activation_checkpointing"]  # recompute block activations in backward
    if ckpt is not None:
        load_checkpoint(ckpt, model)  # before sharding: fully_shard keeps (and splits) the loaded values
    elif init is not None:  # only the weights: optimizer, schedule, step and random streams start afresh
        load_checkpoint(init, model, name=args["init_from"])
    if args["fsdp"]:
        shard_model(model, run)
    # over the shards under FSDP, so AdamW's m and v (zeros_like each parameter) are sharded the same way
    optimizer = AdamW(model.parameters(), lr=args["lr"], betas=(args["beta1"], args["beta2"]),
                      weight_decay=args["weight_decay"], fused=True)  # torch's fused kernel for our update
    batches = torch.Generator().manual_seed(args["seed"])  # same on every rank: see get_batch
    # fp16 has 5 exponent bits (max 65,504, smallest normal 6e-5): small gradients underflow to 0. The scaler
    # multiplies the loss by a large factor before backward and divides the gradients by it before the step; a
    # step whose gradients overflowed (inf/nan) is skipped and the factor halved (Micikevicius et al. 2018).
    scaler = torch.amp.GradScaler(run.device.type, init_scale=FP16_INITIAL_SCALE, enabled=args["dtype"] == "fp16")
    progress = Progress()
    if ckpt is not None:
        load_optimizer_state(run, model, optimizer, ckpt["optimizer"])
        set_rng_state(ckpt["rng"], batches)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        progress = Progress.from_checkpoint(ckpt)
    forward, train_model = wrap_model(model, run)
    return Trainer(model, forward, train_model, optimizer, batches, scaler), progress


def wrap_model(model: TransformerLM, run: Run) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(what evaluation runs, what training runs): torch.compile, then DDP under torchrun (FSDP is already in the
    model's own modules, so it needs no wrapper)."""
    forward = torch.compile(model) if run.args["compile"] else model  # CUDA extra: fused kernels, fewer launches
    if run.world_size == 1 or run.args["fsdp"]:
        return forward, forward
    # DDP: gradients all-reduced (averaged) across ranks during backward
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a copy of them (one
    # gradient-sized buffer less: 8.5 GB for GPT-2 XL in fp32; accounting.py assumes it)
    return forward, torch.nn.parallel.DistributedDataParallel(
        forward, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False,
        gradient_as_bucket_view=True)


FP16_INITIAL_SCALE = 2.0**16  # torch's default; the scaler halves it at each overflow and doubles it every 2,000 steps


def open_run_dir(run: Run, progress: Progress, model: TransformerLM, resumed: bool) -> None:
    """Rank 0: make the run directory, clear the debris of an interrupted write, write config.json, cut log.jsonl
    back to the checkpoint's step when resuming, print the header line."""
    if not run.master:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    for debris in sorted(run.out.glob("*.tmp")):  # a process killed mid-write (SIGKILL, power loss) leaves these
        debris.unlink()
        print(f"removed {debris}: a partial write left by an interrupted run (the file it was replacing is intact)")
    # every resolved flag (model fields included): `--config RUN/config.json --out NEW` repeats this run
    atomic_write_text(run.out / "config.json", json.dumps(run.args, indent=2, default=str) + "\n")
    path = run.out / "log.jsonl"
    kept = [row for row in read_log(path) if row["step"] <= progress.step] if resumed else []
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept))
    n_params = sum(p.numel() for p in model.parameters())
    a = run.args
    print(f"{'resuming' if resumed else 'training'} {n_params / 1e6:.2f}M params on {run.device} ({a['dtype']}"
          f"{', compiled' if a['compile'] else ''}{', FSDP' if a['fsdp'] else ''}, {run.world_size} rank(s)) from step "
          f"{progress.step} to {a['max_iters']}; {run.tokens_per_step:,} tokens/step; run dir {run.out}")


class RunLog:
    """Rank 0's log.jsonl, one JSON row per logged step, and the console line of each row.

    A row that cannot be written (a full disk, an I/O error) is reported once and training goes on: the log is a
    record, the checkpoints are the work. The console line is still printed; log.jsonl lacks the rows from there on
    (read_log tolerates a torn last line). Whether the checkpoints can still be written is checked by the caller.
    With --wandb every row also goes to a Weights & Biases run, which gets the resolved flags as its config."""

    def __init__(self, run: Run, progress: Progress):
        self.run, self.progress = run, progress
        self.path = run.out / "log.jsonl"
        self.wandb = start_wandb(run) if run.master and run.args["wandb"] else None
        self.file = cli.open_for_append(self.path) if run.master else None  # (cli.: a seam for fault tests)
        self.failed = None  # the first write error, once there was one

    def write(self, row: dict, suffix: str = "") -> None:
        if not self.run.master:
            return
        if self.failed is None:
            try:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
            except OSError as e:
                self.failed = describe_fault(e, self.path)
                problem = next_checkpoint_problem(self.run, self.progress)
                if problem:  # the checkpoints cannot be written either: stop now, as a failed checkpoint would
                    raise EnvironmentFault(f"cannot write {self.path} ({self.failed}), and the next checkpoint will "
                                           f"not fit either ({problem}); {resume_hint(self.run, self.progress)}")
                print(f"train.py: warning: cannot write {self.path} ({self.failed}); training goes on, the log "
                      f"stops at step {row['step'] - 1}", file=sys.stderr)
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        print(format_row(row) + suffix, flush=True)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # a failed flush was reported already
                self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(run: Run):
    """--wandb PROJECT: a W&B run in RUN/wandb/ whose config is the run's resolved flags (config.json's contents).
    wandb is an optional package, imported only here."""
    wandb = cli.optional_import("wandb", "wandb", "--wandb")
    return wandb.init(project=run.args["wandb"], name=run.args["wandb_run"], dir=str(run.out),
                      config=json.loads(json.dumps(run.args, default=str)))


def format_row(row: dict) -> str:
    """A log row as its console line: step | loss | lr | grad | ms/step | tok/s | MFU | val loss | val ppl."""
    parts = [f"step {row['step']}"]
    if "loss" in row:
        parts += [f"loss {row['loss']:.4f}", f"lr {row['lr']:.2e}", f"grad {row['grad_norm']:.3f}",
                  f"{row['ms_per_step']:.1f} ms/step", f"{row['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in row:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} fp16 steps skipped")
    if "val_loss" in row:
        parts += [f"val loss {row['val_loss']:.4f}", f"val ppl {row['val_ppl']:.1f}"]
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (--fsdp): parameters, gradients and AdamW state sharded over the ranks
# ---------------------------------------------------------------------------------------------------------------
# DDP keeps a full copy of the model, its gradients and AdamW's two moments on every GPU: 16 bytes per parameter in
# fp32 (34 GB for GPT-2 XL) before any activation. FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter
# along dim 0 over the N ranks, so each keeps 1/N of all of that. Before a unit's forward (and again for its
# backward) its full parameters are all-gathered, and its gradients are reduce-scattered (averaged) after. Each
# TransformerBlock is one unit, so only one block's full parameters exist at a time; the root unit holds the
# embedding, the final norm and lm_head. Mixed precision comes from a MixedPrecisionPolicy (parameters cast to
# bf16/fp16 for the compute, gradients reduced in fp32) instead of autocast. Checkpoints gather the full state to
# rank 0, in the single-process layout, so last.pt is the same file either way: it resumes with or without FSDP and
# on any number of ranks.


def shard_model(model: TransformerLM, run: Run) -> None:
    """fully_shard each block, then the root, over a 1-D mesh of all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # subtle: name the device type. The default mesh takes the accelerator's type even for gloo, and gloo on a GPU
    # machine then crashes (pytorch/pytorch#132471).
    mesh = init_device_mesh(run.device.type, (run.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=AUTOCAST_DTYPES.get(run.args["dtype"]), reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def full_state(run: Run, trainer: Trainer) -> tuple[dict, dict]:
    """(model state dict, optimizer state dict) in the single-process layout. Under FSDP every rank must call this
    (it all-gathers the shards); rank 0 gets the full tensors on the CPU, the others empty dicts."""
    if not run.args["fsdp"]:
        return trainer.model.state_dict(), trainer.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(trainer.model, options=options)
    optim_state = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    return model_state, (indexed_optimizer_state(optim_state) if run.master else {})


def indexed_optimizer_state(state: dict) -> dict:
    """torch.distributed's optimizer state keyed by parameter name -> torch.optim's, keyed by the parameter's index
    in the optimizer (what optimizer.state_dict() gives in one process). named_optimizer_state is the inverse."""
    index = {name: i for i, name in enumerate(name for g in state["param_groups"] for name in g["params"])}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in state["param_groups"]]}


def named_optimizer_state(state: dict, model: torch.nn.Module) -> dict:
    names = [name for name, _ in model.named_parameters()]  # the optimizer's order: it was built from parameters()
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}


def load_optimizer_state(run: Run, model: torch.nn.Module, optimizer: AdamW, state: dict) -> None:
    """A checkpoint's (single-process layout) optimizer state into the optimizer, sharding it under FSDP."""
    if not run.args["fsdp"]:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, named_optimizer_state(state, model) if run.master else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# ---------------------------------------------------------------------------------------------------------------
# The steps of the loop: train, log, evaluate, checkpoint, stop
# ---------------------------------------------------------------------------------------------------------------


def train_step(run: Run, trainer: Trainer, progress: Progress) -> torch.Tensor:
    """One optimizer update: per micro-batch batch, forward, loss, backward; then clip and step. Returns the
    gradient norm before clipping, a 0-dim tensor (no sync)."""
    accum = run.args["grad_accum"]
    for i in range(accum):
        x, y = get_batch(run.train_data, run.micro_batch, run.cfg.context_length, run.device, trainer.batches,
                         vocab_size=run.cfg.vocab_size, rank=run.rank, world_size=run.world_size)
        with gradient_sync(run, trainer, last=i == accum - 1):
            with run.autocast:
                loss = cross_entropy(trainer.train(x), y)
            # / accum: the sum of micro-gradients is the mean over the batch; scale(): x the fp16 loss scale
            trainer.scaler.scale(loss / accum).backward()
        progress.add_loss(loss.detach() / accum)
    trainer.scaler.unscale_(trainer.optimizer)  # true gradients before clipping, so --grad-clip sees real norms
    # clipping by AdamW's grad_divisor: its fused kernel divides the gradients as it updates (optim.clip_divisor)
    grad_norm, divisor = clip_divisor(trainer.model.parameters(), run.args["grad_clip"] or math.inf)
    if trainer.scaler.is_enabled():
        progress.skipped_steps += ~torch.isfinite(grad_norm)  # exactly the steps the scaler will skip (no sync)
    trainer.scaler.step(trainer.optimizer, grad_divisor=divisor)  # the step, unless a gradient was inf/nan
    trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def gradient_sync(run: Run, trainer: Trainer, last: bool):
    """Reduce gradients across ranks only in the backward of a step's last micro-batch: the earlier ones just add
    to the local gradients (DDP's no_sync; FSDP's set_requires_gradient_sync)."""
    if run.args["fsdp"]:
        trainer.model.set_requires_gradient_sync(last)
    elif run.world_size > 1 and not last:
        return trainer.train.no_sync()
    return contextlib.nullcontext()


def check_finite(run: Run, progress: Progress, lr: float) -> None:
    """Stop with FloatingPointError once a loss was nan/inf. The flag is read (.item(), a sync) only when logging
    or saving, so no step waits for the GPU; no checkpoint is written after a NaN, so last.pt is the last good one."""
    if progress.nonfinite.item():
        kept = (f"{run.out}/last.pt (step {progress.last_saved_step}) is the last good checkpoint"
                if progress.last_saved_step else "no checkpoint")
        raise FloatingPointError(f"loss became nan/inf by step {progress.step} (lr {lr:.2e}): the learning rate is "
                                 f"probably too high, try --lr {run.args['lr'] / 10:g}; {kept}")


def log_row(run: Run, progress: Progress, lr: float, grad_norm: torch.Tensor) -> dict:
    """The log row of a logging step: the mean train loss since the last one, lr, gradient norm, speed, MFU."""
    if run.world_size > 1:
        dist.all_reduce(progress.loss_sum)
        progress.loss_sum /= run.world_size
        progress.nonfinite |= ~torch.isfinite(progress.loss_sum)  # so every rank stops at the same step
    check_finite(run, progress, lr)
    steps = progress.step - progress.last_log_step
    dt = time.time() - progress.last_log_time
    tokens_per_s = run.tokens_per_step * steps / dt
    row = {"step": progress.step, "loss": progress.loss_sum.item() / steps,  # note: .item() syncs; only here
           "lr": lr, "grad_norm": float(grad_norm), "tokens": progress.step * run.tokens_per_step,
           "time": round(progress.seconds(), 3), "ms_per_step": 1000 * dt / steps, "tokens_per_s": tokens_per_s}
    if run.peak:
        row["mfu"] = tokens_per_s * accounting.train_flops_per_token(run.cfg) / run.peak
    if run.args["dtype"] == "fp16":
        row["skipped_steps"] = int(progress.skipped_steps)  # since the run began
    if run.device.type == "cuda":  # the most this process's tensors have held at once (accounting.py predicts it)
        row["max_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 1e9
    progress.loss_sum.zero_()
    progress.last_log_step = progress.step
    return row


def validation_loss(run: Run, trainer: Trainer) -> float:
    """Mean loss over the fixed validation windows; ranks share the windows."""
    return evaluate(trainer.forward, run.val_data, run.val_starts, run.micro_batch, run.cfg.context_length,
                    run.device, run.autocast, run.cfg.vocab_size, run.rank, run.world_size)


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number (JSON has no inf)."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


MAX_LOG_PERPLEXITY = 50  # exp(50) ≈ 5e21: far above any real perplexity (ln of a 50K vocabulary is 10.8)


def save_checkpoints(run: Run, trainer: Trainer, progress: Progress, *, last: bool, best: bool) -> None:
    """last.pt first (it is what --resume needs), then best.pt: a hard link to last.pt when both hold this step's
    state (one serialisation, no extra disk), else a write of its own. Rank 0 writes; the state is the same on all
    (under FSDP every rank takes part in gathering it). A write fault stops the run (EnvironmentFault, exit code 1)
    with the previous checkpoints intact, saying how to continue; a checkpoint that will not fit next time is
    warned about now, once."""
    if not (last or best):
        return
    state = full_state(run, trainer)
    if run.master:
        try:
            if last:
                write_checkpoint("last.pt", run, trainer, state, progress, last_saved_step=progress.step)
            if best and last:
                link_or_copy(run.out / "last.pt", run.out / "best.pt")
            elif best:
                write_checkpoint("best.pt", run, trainer, state, progress, last_saved_step=progress.last_saved_step)
        except WriteFault as e:
            raise EnvironmentFault(f"{e}; {resume_hint(run, progress)}") from None
        warn_if_next_checkpoint_wont_fit(run, progress)
    if last:
        progress.last_saved_step = progress.step


def write_checkpoint(name: str, run: Run, trainer: Trainer, state: tuple[dict, dict], progress: Progress,
                     last_saved_step: int) -> None:
    """Everything exact resume needs, to run.out/name: model and optimizer state (full, unsharded), the flags, the
    random streams, the fp16 scaler and the loop's bookkeeping."""
    plain_args = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in run.args.items()}
    ckpt = checkpoint_dict(*state, progress.step, run.cfg, run.args["tokenizer"], train_args=plain_args,
                           rng=rng_state(trainer.batches), scaler=trainer.scaler.state_dict(),
                           progress=progress.state_dict() | {"last_saved_step": last_saved_step})
    write_checkpoint_file(ckpt, run.out / name)
    progress.checkpoint_size = (run.out / name).stat().st_size  # what the next one will need


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the file src is: a hard link (no bytes written), or a copy where the file system has none; both
    through dst.tmp and os.replace, so dst is never half-written. note: the link stays correct when src is later
    rewritten, because every checkpoint write replaces the directory entry (a new file), never the old file's bytes."""
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return
    except OSError:  # no hard links here (FAT, some network file systems): copy instead
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    with open(src, "rb") as source, atomic_file(dst, needed=src.stat().st_size) as target:
        shutil.copyfileobj(source, target)


def resume_hint(run: Run, progress: Progress) -> str:
    if progress.last_saved_step:
        return (f"free space, then `python train.py --resume {run.out}` continues from step "
                f"{progress.last_saved_step} ({run.out}/last.pt is intact)")
    return "no checkpoint was written yet: free space (or pick another --out) and start again"


def next_checkpoint_problem(run: Run, progress: Progress) -> str | None:
    """Why the next checkpoint (progress.checkpoint_size bytes beside the current one) will not fit, or None."""
    return space_problem(run.out / "last.pt", progress.checkpoint_size)


def warn_if_next_checkpoint_wont_fit(run: Run, progress: Progress) -> None:
    problem = next_checkpoint_problem(run, progress)
    if problem and not progress.space_warned:
        progress.space_warned = True
        print(f"train.py: warning: the next checkpoint will not fit in {run.out} ({problem}): free space now, or "
              f"the run stops when it writes it", file=sys.stderr)


def expected_checkpoint_bytes(trainer: Trainer) -> int:
    """Before the first checkpoint: every parameter three times (weights, AdamW's m and v), plus the buffers.
    (numel() of an FSDP-sharded parameter is its full size: the checkpoint holds the full tensors.)"""
    params, buffers = list(trainer.model.parameters()), list(trainer.model.buffers())
    nbytes = 3 * sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in buffers)
    return checkpoint_file_bytes(nbytes, 3 * len(params) + len(buffers))


class StopNow(KeyboardInterrupt):
    """The second stop signal: stop at once, without a checkpoint. main() exits with 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class Stop:
    """The first SIGINT (Ctrl-C) or SIGTERM sets a flag: the loop finishes its step, checkpoints and exits. A second
    one raises StopNow (a KeyboardInterrupt) at once, wherever the loop is: whoever sends it did not want to wait."""

    def __init__(self, out: Path):
        self.out, self.requested = out, None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise StopNow(f"second {name} ({self.requested} first): stopped at once without saving; "
                          f"`python train.py --resume {self.out}` continues from the last checkpoint", signum)
        self.requested = name

    def agreed(self, run: Run, is_log: bool) -> bool:
        """Whether to stop after this step. One process: as soon as a signal came. Several: all ranks agree (an
        all-reduce) at a log step, so no rank is left waiting in an all-reduce that the others never join."""
        if run.world_size == 1 or not is_log:
            return run.world_size == 1 and self.requested is not None
        flag = torch.tensor(float(self.requested is not None), device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def loss_over_windows(model, data, starts, window: int, batch_size: int, device, autocast=contextlib.nullcontext(),
                      vocab_size=None, scored=None, rank: int = 0, world_size: int = 1) -> tuple[float, int]:
    """(summed loss in nats, number of targets) over the windows data[s : s+window+1], s in starts, scored in
    batches of batch_size. scored[i] (default: all `window`) is how many of window i's last targets count: a
    sliding window with stride < window scores only the targets no earlier window scored (sample.py --eval).
    Ranks take every world_size-th batch and all-reduce the sums. The one evaluator: validation and --eval."""
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
                n, loss = y.numel(), cross_entropy(logits, y)
            else:  # keep the last scored[r] targets of each row r
                first = torch.as_tensor(window - scored[i:i + batch_size], device=device)[:, None]  # (b, 1)
                keep = torch.arange(window, device=device)[None, :] >= first                    # (b, T)
                n, loss = int(scored[i:i + batch_size].sum()), cross_entropy(logits[keep], y[keep])  # (n, V), (n,)
        loss_sum += loss.float() * n * weight  # a mean over n targets back to their sum
        count += n * weight
    if world_size > 1:
        both = torch.stack([loss_sum, torch.tensor(float(count), device=device)])
        dist.all_reduce(both)
        loss_sum, count = both[0], int(both[1].item())
    return loss_sum.item(), count  # note: .item() waits for the device (fine: once per evaluation)


def evaluate(model, data, starts, micro_batch, context_length, device, autocast, vocab_size=None, rank=0,
             world_size=1) -> float:
    """Mean loss per token over the fixed validation windows `starts` (the model is put back in training mode)."""
    model.eval()
    loss_sum, count = loss_over_windows(model, data, starts, context_length, micro_batch, device, autocast,
                                        vocab_size, rank=rank, world_size=world_size)
    model.train()
    return loss_sum / count


def read_log(path) -> list[dict]:
    """log.jsonl rows; a torn last line (a process killed mid-write) is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


def train(args: dict, ckpt: dict | None = None) -> Path:
    """Run (or resume) training as `args` say; returns the run directory. `args` itself is left unchanged."""
    run, init = setup_run(args, ckpt)
    trainer, progress = build_trainer(run, ckpt, init)
    resumed = ckpt is not None
    del ckpt, init  # the loaded copies of weights and optimizer state: the model and optimizer hold their own now
    open_run_dir(run, progress, trainer.model, resumed=resumed)
    progress.checkpoint_size = expected_checkpoint_bytes(trainer)
    log = RunLog(run, progress)
    progress.begin(run.device)
    stop = Stop(run.out)
    try:
        if progress.step == 0:  # step 0: the loss of the untrained model (about ln V) anchors every curve
            val = validation_loss(run, trainer)
            log.write({"step": 0, "lr": run.lr_at(0), "tokens": 0, "time": round(progress.elapsed, 3),
                       "val_loss": val, "val_ppl": perplexity(val)})
            progress.last_log_time = time.time()
        for step in range(progress.step + 1, run.args["max_iters"] + 1):  # step = updates done after this one
            # The algorithm: lr from the schedule, then one update (batch, forward, loss, backward, clip, step).
            lr = run.lr_at(step - 1)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            grad_norm = train_step(run, trainer, progress)
            progress.step = step
            is_eval = step % run.args["eval_interval"] == 0 or step == run.args["max_iters"]
            is_log = step % run.args["log_interval"] == 0 or is_eval
            stopping = stop.agreed(run, is_log)
            best = False
            if is_log:
                row = log_row(run, progress, lr, grad_norm)
                if is_eval:
                    val = validation_loss(run, trainer)
                    row.update(val_loss=val, val_ppl=perplexity(val))
                    best = val < progress.best_val_loss
                    progress.best_val_loss = min(val, progress.best_val_loss)
                log.write(row, " | best" if best else "")
            last = step % run.args["ckpt_interval"] == 0 or step == run.args["max_iters"] or stopping
            if last:
                check_finite(run, progress, lr)  # never checkpoint a NaN: last.pt stays the last good state
            save_checkpoints(run, trainer, progress, last=last, best=best)
            if is_log:
                progress.last_log_time = time.time()  # ms/step and tokens/s exclude evaluation and checkpoint time
            if stopping:
                if run.master:
                    print(f"{stop.requested}: saved {run.out}/last.pt at step {step}; continue with "
                          f"`python train.py --resume {run.out}`")
                break
        if dist.is_initialized():
            # Every rank waits here for the others before tearing the process group down. Without it a rank that
            # finishes first (rank 0 still writing last.pt) and exits could die in gloo's teardown ("terminate
            # called without an active exception", SIGABRT after the last step: 8 of 45 two-rank runs on a busy
            # 2-core machine, 0 of 60 with the barrier). Only when the loop ended normally (done, or a stop all
            # ranks agreed on), never in `finally`: after an error on one rank the others would wait here forever.
            dist.barrier()
    finally:
        stop.restore()
        log.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return run.out


def train_main(argv) -> Path:
    return train(*resolve_args(argv))  # (no reference to the resumed checkpoint stays here while training runs)


# ---------------------------------------------------------------------------------------------------------------
# Plots: python train.py plot RUN_DIR... -o curves.png
# ---------------------------------------------------------------------------------------------------------------


def plot(run_dirs, out_png) -> None:
    """Train (solid) and validation (dashed) loss against optimizer step and wall-clock time, one colour per run."""
    cli.optional_import("matplotlib", "matplotlib", "plotting").use("Agg")  # files only: no display needed
    plt = cli.optional_import("matplotlib.pyplot", "matplotlib", "plotting")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in run_dirs:
        rows = read_log(Path(run) / "log.jsonl")
        if not rows:
            raise BadInputError(f"{run} has no log.jsonl rows to plot (is it a train.py run directory?)")
        name = Path(run).name
        for ax, x_key in ((by_step, "step"), (by_time, "time")):
            train = [(r[x_key], r["loss"]) for r in rows if "loss" in r]
            val = [(r[x_key], r["val_loss"]) for r in rows if "val_loss" in r]
            (line,) = ax.plot(*zip(*train), label=f"{name} train") if train else ax.plot([], [])
            if val:
                ax.plot(*zip(*val), "--o", markersize=3, color=line.get_color(), label=f"{name} val")
    for ax, label in ((by_step, "optimizer step"), (by_time, "wall-clock time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out_png) as f:  # all or nothing, like every file the project writes
        fig.savefig(f, dpi=120, format=Path(out_png).suffix.lstrip(".") or "png")
    print(f"wrote {out_png}")


def plot_main(argv) -> None:
    p = OneLineParser(prog="train.py plot", description="loss curves of one or more run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    a = p.parse_args(argv)
    plot(a.runs, a.out)


# ---------------------------------------------------------------------------------------------------------------
# Sharing a model: python train.py export CKPT --out DIR, python train.py import DIR --out RUN
# ---------------------------------------------------------------------------------------------------------------
# A Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
# generation_config.json) is what transformers' AutoModelForCausalLM / AutoTokenizer, the Hub, lm-evaluation-harness
# and the vLLM and llama.cpp converters read. The conversions live with what they convert (tensor names, the RoPE
# permutation and the config in model.py; tokenizer.json in bpe.py); here are only the files. The safetensors
# package is optional: these commands import it, nothing else does.

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # one file, or shards listed in NAME.index.json


def export_hf(ckpt_path, out_dir, tokenizer_dir=None) -> Path:
    """A train.py checkpoint -> a Hugging Face Llama directory that from_pretrained loads with no custom code."""
    ckpt = read_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, ckpt_path)
    tensors = to_hf_llama_state_dict(cfg, ckpt["model"])  # refuses the ablations HF Llama cannot express
    tok = checkpoint_tokenizer(ckpt, tokenizer_dir, cfg.vocab_size)
    if tok is None:
        raise BadInputError(f"checkpoint {ckpt_path} names no tokenizer_dir: pass --tokenizer DIR")
    safetensors_torch = cli.optional_import("safetensors.torch", "safetensors", "writing model.safetensors")
    eot = tok.special_token_ids.get(bpe.END_OF_TEXT)  # BOS and EOS, as GPT-2's <|endoftext|> is both
    try:
        bpe.hf_tokenizer_json(tok)  # a tokenizer that tokenizer.json cannot hold is refused before anything is written
    except ValueError as e:
        raise BadInputError(f"tokenizer of {ckpt_path}: {e}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # note: safetensors.torch.save returns the file as bytes (the weights once more in memory) for atomic_file to
    # write all or nothing; transformers checks for the "format": "pt" metadata.
    data = safetensors_torch.save(tensors, metadata={"format": "pt"})
    with atomic_file(out / HF_WEIGHTS[0], needed=len(data)) as f:
        f.write(data)
    for name, obj in (("config.json", to_hf_llama_config(cfg, eot, eot)),
                      ("generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})):
        atomic_write_text(out / name, json.dumps(obj, indent=2) + "\n")
    bpe.save_hf_tokenizer(tok, out, model_max_length=cfg.context_length)
    return out


def import_hf(hf_dir, run_dir, overwrite: bool = False) -> Path:
    """A Hugging Face Llama directory -> RUN/last.pt (weights and model config, no training state) and the tokenizer
    files beside it, so sample.py, --eval and --init-from work on it as on any run of train.py."""
    src, run = Path(hf_dir), Path(run_dir)
    if (run / "last.pt").exists() and not overwrite:
        raise BadInputError(f"{run} already holds a checkpoint: pass --overwrite or a new --out")
    cfg = from_hf_llama_config(read_json(src / "config.json"), str(src / "config.json"))
    tok = hf_dir_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise BadInputError(f"{src}: tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
                            f"{cfg.vocab_size}")
    state = from_hf_llama_state_dict(cfg, read_hf_weights(src), str(src))
    # The model is built on the meta device (no memory, no random init) and takes the imported tensors as its own.
    model = TransformerLM(**dataclasses.asdict(cfg), device="meta")
    model.load_state_dict(state, assign=True)
    run.mkdir(parents=True, exist_ok=True)
    tok.save_dir(run)
    save_checkpoint(model, None, 0, run / "last.pt", tokenizer_dir=str(run.resolve()),
                    imported_from=str(src.resolve()))
    return run


def read_json(path: Path):
    """A JSON file of a model directory, or a one-line BadInputError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist: is {path.parent} a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e})") from None


def hf_dir_tokenizer(src: Path) -> bpe.Tokenizer:
    """The Tokenizer of an HF directory's tokenizer.json; anything but byte-level BPE is refused with one line."""
    path = src / "tokenizer.json"
    if not path.is_file():
        found = "a SentencePiece tokenizer.model" if (src / "tokenizer.model").is_file() else "no tokenizer.json"
        raise BadInputError(f"{src} has {found}: only a byte-level BPE tokenizer.json can be imported")
    try:
        return bpe.tokenizer_from_hf_json(read_json(path), str(path))
    except ValueError as e:
        raise BadInputError(str(e)) from None


def read_hf_weights(src: Path) -> dict:
    """Every tensor of an HF directory: model.safetensors or pytorch_model.bin, or the shards their .index.json
    names. note: a .bin is a pickle; weights_only=True loads its tensors without running any of its code."""
    for name in HF_WEIGHTS:
        index = src / f"{name}.index.json"
        if (src / name).is_file():
            files = [src / name]
        elif index.is_file():
            files = sorted({src / shard for shard in read_json(index)["weight_map"].values()})
        else:
            continue
        if name.endswith(".safetensors"):
            load = cli.optional_import("safetensors.torch", "safetensors", f"reading {name}").load_file
        else:
            load = load_weights_only
        tensors = {}
        for path in files:
            try:
                tensors.update(load(path))
            except Exception as e:  # truncated, not a weights file, or a pickle of more than tensors
                raise BadInputError(f"{path} is corrupt or not a weights file ({error_summary(e)})") from None
        return tensors
    raise BadInputError(f"{src} has no {' or '.join(HF_WEIGHTS)} (nor a sharded .index.json)")


def export_main(argv) -> None:
    p = OneLineParser(prog="train.py export", description="a checkpoint as a Hugging Face Llama directory")
    p.add_argument("ckpt", help="a .pt that train.py wrote (e.g. RUN/best.pt)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    a = p.parse_args(argv)
    out = export_hf(a.ckpt, a.out, a.tokenizer)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, ...): "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer load it")


def import_main(argv) -> None:
    p = OneLineParser(prog="train.py import", description="a Hugging Face Llama directory as a run directory")
    p.add_argument("hf_dir", metavar="DIR", help="config.json, model.safetensors or pytorch_model.bin, tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument("--overwrite", action="store_true", help="replace RUN/last.pt")
    a = p.parse_args(argv)
    run = import_hf(a.hf_dir, a.out, a.overwrite)
    print(f"wrote {run}/last.pt and its tokenizer; next: python sample.py {run}/last.pt, or fine-tune with "
          f"python train.py --init-from {run}/last.pt --data DIR")


# ---------------------------------------------------------------------------------------------------------------
# The offline demo: python train.py
# ---------------------------------------------------------------------------------------------------------------
# The whole stack on a corpus every Python installation carries: the documentation topics of the `help()`
# system (pydoc_data.topics, about 465K characters of English about Python). Each hop is one named function:
# bpe.train_bpe -> Tokenizer.save_dir -> bpe.encode_file -> train() -> sample.load_model -> sample.generate.

DEMO = {  # full: about a minute on 2 CPU cores; quick: seconds, for CI
    "full": dict(vocab_size=1024, docs=None, flags=["--context-length", "128", "--d-model", "128", "--num-layers",
                 "4", "--num-heads", "4", "--d-ff", "344", "--batch-size", "16", "--max-iters", "300", "--lr",
                 "3e-3", "--min-lr", "3e-4", "--warmup-iters", "20", "--eval-interval", "100", "--eval-iters", "8",
                 "--log-interval", "20"], new_tokens=120),
    "quick": dict(vocab_size=300, docs=12, flags=["--context-length", "32", "--d-model", "32", "--num-layers", "2",
                  "--num-heads", "2", "--d-ff", "96", "--batch-size", "8", "--max-iters", "20", "--lr", "3e-3",
                  "--min-lr", "3e-4", "--warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "2",
                  "--log-interval", "5", "--peak-flops", "0"], new_tokens=30),
}


def demo(out: Path, quick: bool = False) -> None:
    from pydoc_data.topics import topics  # imported here: only the demo needs it
    # note: the one place a lower layer reaches up: the demo's last hop samples from the model it trained, with
    # sample.py (which imports train.py), so the import waits until it is needed.
    import sample
    setting = DEMO["quick" if quick else "full"]
    t_start = time.time()
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    data_dir.mkdir(parents=True, exist_ok=True)

    # 1. corpus: one document per help topic, in a fixed order; the last tenth is the validation split.
    docs = [topics[k].strip() for k in sorted(topics)][:setting["docs"]]
    n_valid = max(1, len(docs) // 10)
    for name, split in (("train.txt", docs[:-n_valid]), ("valid.txt", docs[-n_valid:])):
        atomic_write_text(data_dir / name, "".join(doc + bpe.END_OF_TEXT for doc in split))
    print(f"[1/5] corpus: {len(docs)} pydoc topics, {sum(map(len, docs)):,} characters -> {data_dir}/train.txt, "
          f"valid.txt")

    # 2. a byte-level BPE tokenizer trained on the training split, saved as a tokenizer directory.
    t = time.time()
    vocab, merges = bpe.train_bpe(data_dir / "train.txt", setting["vocab_size"], special_tokens=[bpe.END_OF_TEXT])
    tokenizer = bpe.Tokenizer(vocab, merges, special_tokens=[bpe.END_OF_TEXT])
    tokenizer.save_dir(data_dir)  # vocab.json, merges.txt, special_tokens.json
    print(f"[2/5] BPE: {len(vocab)} tokens, {len(merges)} merges in {time.time() - t:.1f}s -> {data_dir}/vocab.json")

    # 3. both splits encoded to uint16 .npy: data_dir is now what `bpe.py prepare` makes.
    t = time.time()
    n = {split: bpe.encode_file(tokenizer, data_dir / f"{split}.txt", data_dir / f"{split}.npy")
         for split in ("train", "valid")}
    print(f"[3/5] encoded {n['train']:,} training and {n['valid']:,} validation tokens in {time.time() - t:.1f}s "
          f"-> {data_dir}/train.npy, valid.npy")

    # 4. train a small model: exactly what this command line does.
    argv = ["--data", str(data_dir), "--out", str(run_dir), "--overwrite", "--device", "cpu", *setting["flags"]]
    print(f"[4/5] training: python train.py {' '.join(argv)}")
    t = time.time()
    train_main(argv)
    print(f"      trained in {time.time() - t:.1f}s")

    # 5. sample from the checkpoint, rebuilding model and tokenizer from it alone (as sample.py does).
    model, tok, _ = sample.load_model(run_dir / "last.pt", "cpu")
    prompt = "The "
    ids = sample.generate(model, tok.encode(prompt), setting["new_tokens"], temperature=0.8, top_p=0.95,
                          eos_id=tok.special_token_ids[bpe.END_OF_TEXT], generator=torch.Generator().manual_seed(0))
    print(f"[5/5] sample (temperature 0.8, top-p 0.95):\n\n{prompt}{tok.decode(ids.tolist())}\n")
    print(f"demo done in {time.time() - t_start:.0f}s. Files: corpus, tokenizer and token ids in {data_dir}/; "
          f"log.jsonl, last.pt, best.pt in {run_dir}/\n"
          f"next:\n"
          f"  python sample.py {run_dir}/last.pt              # more samples from this model\n"
          f"  python train.py plot {run_dir} -o curves.png    # its loss curves\n"
          f"  python bpe.py prepare tinystories --out data/tinystories    # the handout's dataset (downloads)\n"
          f"  python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m   # on a GPU")


def demo_main(argv) -> None:
    p = OneLineParser(prog="train.py demo",
                          description="offline end-to-end demo (also what `python train.py` runs)")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version for CI")
    a = p.parse_args(argv)
    demo(Path(a.out), quick=a.quick)


# ---------------------------------------------------------------------------------------------------------------


def flush_subnormals() -> bool:
    """Make every CPU thread flush subnormal floats (|x| < 1.2e-38 in fp32) to zero; returns whether the CPU can.

    x86 computes on subnormals in microcode, far slower than on normal floats (bench/bench_subnormal.py: a multiply
    16x and a fused AdamW step 20x slower on subnormal inputs). A run that drives some of its state toward zero (an
    lr of 0.64 on the --cpu experiments' model) slowed from ~220 to 1,240 ms/step between steps 250 and 324 without
    this, and stayed at 190 ms/step for all 733 steps with it (BENCHMARKS.md). Flushing changes numbers below any
    loss's resolution: a baseline run's losses move by ~1e-7.

    torch.set_flush_denormal sets the calling thread's FTZ/DAZ bits, and a thread created later copies them from its
    creator. So this must run before torch's OpenMP thread pool starts (the first parallel op): called after, it
    flushes only in the main thread, i.e. half of a 2-thread op's results. That is why it sits first in __main__."""
    return torch.set_flush_denormal(True)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory a training step frees for the next step; returns whether it could.

    A CPU step allocates and frees the same large tensors every step (activations, gradients, the loss's chunks).
    glibc hands an allocation above its mmap threshold (128 KiB, raised as it goes to at most 32 MiB) fresh pages
    from the kernel and gives them back on free, and it trims the free top of its heap; either way the next step
    writes to new pages, and the first write to each 4 KiB page is a page fault (several microseconds on a VM).
    With a 1 GiB threshold and no trimming the heap keeps what was freed and, after a few steps of growing, the
    next step reuses it: `python train.py --preset ts17m` on 2 cores (a Xeon VM) 865-890 ms/step in fp32 against
    1,010-1,037 without, 437-446 against 474-495 in bf16 (BENCHMARKS.md). The cost: the process keeps its peak
    heap until it exits, a peak a training run reaches every step anyway. Off glibc (macOS, Windows, musl) it does
    nothing."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the interpreter itself runs on
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>; mallopt returns 1 on success
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1


PROCESS_TUNING: dict = {}  # what tune_process set in this process: {setting: whether it took effect}


def tune_process() -> dict:
    """The process-wide CPU settings `python train.py` runs under (the benchmarks call this too, so that they time
    what train.py runs): {setting: whether it took effect}. First thing in a process: see flush_subnormals."""
    PROCESS_TUNING.update(flush_subnormals=flush_subnormals(), keep_freed_memory=keep_freed_memory())
    return dict(PROCESS_TUNING)


def tuning_line() -> str:
    """For benchmark reports: which of tune_process's settings this process runs under."""
    on = [name for name, took in PROCESS_TUNING.items() if took]
    return f"train.tune_process(): {', '.join(on) or 'nothing took effect'}" if PROCESS_TUNING else "process untuned"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("plot", "demo", "export", "import") else "train"
    try:
        if command == "plot":
            plot_main(argv[1:])
        elif command == "export":
            export_main(argv[1:])
        elif command == "import":
            import_main(argv[1:])
        elif command == "demo" or not argv:
            demo_main(argv[1:])
        else:
            train_main(argv)
    except BadInputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FloatingPointError, EnvironmentFault, OSError, StopNow) as e:
        # not the input's fault: a diverged loss, a full disk, a failed write, a read-only or vanished directory, or
        # a second stop signal (whose exit code is 128 + the signal's number)
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, StopNow) else EXIT_ENVIRONMENT
    return 0


def exit_skipping_teardown(code: int) -> None:
    """End a torchrun rank at once with `code`, skipping the interpreter's teardown (os._exit).

    Why: a gloo rank could die at the very end, after its last step, destroy_process_group and all its Python code:
    "terminate called without an active exception", SIGABRT (faulthandler shows no Python frame left), in ~1 of 50
    two-rank FSDP runs on a loaded 2-core machine. gloo's threads can still hold work objects whose tensors need
    the GIL to die, which an interpreter being torn down no longer gives (pytorch/pytorch#179291). Nothing is lost:
    by then train() has closed everything it wrote (checkpoints are written atomically, the log and a W&B run are
    closed in its `finally`); only stdout and stderr may still hold buffered text."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    tune_process()  # first: the threads torch starts later inherit the subnormal setting
    exit_code = main()
    if "WORLD_SIZE" in os.environ:  # a rank that torchrun started (see exit_skipping_teardown)
        exit_skipping_teardown(exit_code)
    sys.exit(exit_code)
