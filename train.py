"""train.py: the training loop of a Transformer LM (CS336 assignment 1, §5 "Training loop" and §7 "Experiments").

Random windows from a memory-mapped array of token ids (`get_batch`), the model from model.py, AdamW, the cosine
schedule and gradient clipping from optim.py, evaluation on a fixed set of validation windows, a JSONL log,
atomic checkpoints with exact resume, the CUDA extras (bf16 autocast, TF32, pinned memory, torch.compile), and
DistributedDataParallel under torchrun. With no arguments it runs an offline demo of the whole stack.

    python train.py                                        # offline demo: BPE -> encode -> train -> sample (CPU, minutes)
    python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m
    torchrun --nproc_per_node 8 train.py --data data/owt --preset ts17m --batch-size 256 --compile
    python train.py --resume runs/ts17m                    # continue exactly where it stopped (Ctrl-C saves first)
    python train.py plot runs/a runs/b -o curves.png       # loss vs step and vs wall time
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import accounting
import bpe
from cli import BadInputError, OneLineParser
from model import PRESETS, ModelConfig, TransformerLM
from optim import AdamW, clip_grad_norm, cosine_lr, cross_entropy


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


def batch_at(data: np.ndarray, starts: np.ndarray, context_length: int, device, vocab_size: int | None = None):
    """The windows data[s : s+T+1] for each start s, split into inputs x = ids[:-1] and targets y = ids[1:].

    Returns two int64 tensors of shape (B, T) on `device`; y is x shifted left by one token."""
    idx = starts[:, None] + np.arange(context_length + 1)  # (B, T+1) positions
    window = data[idx]  # (B, T+1) fancy indexing on the memmap reads just these ids
    if vocab_size is not None and window.size and int(window.max()) >= vocab_size:
        row, col = np.argwhere(window >= vocab_size)[0]
        name = getattr(data, "filename", None) or "the data array"
        raise BadInputError(f"token id {int(window[row, col])} at position {int(starts[row]) + int(col)} of {name} "
                            f"is >= vocab_size {vocab_size}: pass the tokenizer's --vocab-size or use matching data")
    window = torch.from_numpy(window.astype(np.int64))
    if device.type == "cuda":
        # CUDA extra: page-locked host memory lets the copy run asynchronously (non_blocking) beside the GPU's work.
        window = window.pin_memory().to(device, non_blocking=True)
    else:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]  # x (B, T), y (B, T)


def get_batch(data, batch_size: int, context_length: int, device, generator: torch.Generator | None = None, *,
              vocab_size: int | None = None, rank: int = 0, world_size: int = 1):
    """batch_size random windows of context_length + 1 ids from `data` -> (x, y), each (batch_size, context_length).

    Start offsets are uniform over every valid position. With world_size > 1 (DDP) every rank draws the same
    batch_size * world_size offsets from an identically seeded generator and keeps its own slice, so the global
    batch is exactly the one a single process would draw (and the ranks never read the same window)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {device} requested but CUDA is not available")
    if len(data) <= context_length:
        raise BadInputError(f"data has {len(data)} tokens, fewer than context_length + 1 = {context_length + 1}")
    # Valid starts are 0 .. len - T - 1, so the target of the last input (position s + T) is still in the data.
    starts = torch.randint(len(data) - context_length, (batch_size * world_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].numpy()
    return batch_at(data, starts, context_length, device, vocab_size)


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


def open_data(train_path, val_path, context_length):
    """Memory-map the splits; without validation data the last 10% of the training file is held out (a view)."""
    train = load_tokens(train_path)
    if val_path is not None:
        val = load_tokens(val_path)
    else:
        cut = int(len(train) * 0.9)
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
#   train_args (the resolved flags), rng (RNG states), tokenizer_dir (str or None), plus extras
#   (best_val_loss, elapsed seconds) that exact resume needs.


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


def save_checkpoint(model, optimizer, iteration: int, out, **extra) -> None:
    """Write model + optimizer state and `extra` values to `out` (a path or a binary file object).

    A path is written atomically: to a temporary file in the same directory, flushed to disk, then os.replace()d
    over the target, so a crash mid-write leaves the previous checkpoint intact, never a torn one."""
    model = unwrap(model)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "iteration": int(iteration), "tokenizer_dir": None}
    if hasattr(model, "config"):
        ckpt["model_config"] = dataclasses.asdict(model.config)
    ckpt.update(extra)
    if not isinstance(out, (str, os.PathLike)):
        torch.save(ckpt, out)
        return
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)  # atomic on POSIX and Windows: readers see the old file or the new one


def read_checkpoint(src) -> dict:
    """torch.load(weights_only=True) onto the CPU, with a one-line error for a missing or corrupt file."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInputError(f"checkpoint {src} does not exist") from None
    except Exception as e:
        raise BadInputError(f"checkpoint {src} is corrupt or not a train.py checkpoint "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); try best.pt beside it") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "iteration" not in ckpt:
        raise BadInputError(f"checkpoint {src} is not a train.py checkpoint (no 'model'/'iteration' entries)")
    return ckpt


def load_checkpoint(src, model, optimizer=None) -> int:
    """Restore model (and optimizer) state from `src` (path, file object or an already-loaded dict); returns the
    iteration it was saved at."""
    ckpt = src if isinstance(src, dict) else read_checkpoint(src)
    unwrap(model).load_state_dict(ckpt["model"])
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
    ckpt_interval=500, seed=0, device=None, dtype=None, compile=False, peak_flops=None, out=None, overwrite=False,
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
    a("--norm", choices=["pre", "post", "none"], help="ablation: RMSNorm placement")
    a("--position", choices=["rope", "nope"], help="ablation: RoPE or no position embedding")
    a("--ffn", choices=["swiglu", "silu"], help="ablation: gated SwiGLU or plain SiLU FFN")
    a("--tie-embeddings", action=argparse.BooleanOptionalAction, help="share token embedding and lm_head")
    a("--attn-impl", choices=["sdpa", "manual"], help="fused torch SDPA or the from-scratch reference")
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
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    a("--overwrite", action=argparse.BooleanOptionalAction, help="start afresh in an --out that has a checkpoint")
    a("--config", metavar="FILE.json", help="defaults for any flag (keys are flag names); command line wins")
    a = p.add_argument_group("hardware").add_argument
    a("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    a("--dtype", choices=["fp32", "bf16"], help="bf16 autocast or fp32 (default bf16 on CUDA with bf16 support)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
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
        if not (run_dir / "last.pt").is_file():
            raise BadInputError(f"--resume {run_dir}: no checkpoint {run_dir / 'last.pt'} to resume from")
        ckpt = read_checkpoint(run_dir / "last.pt")
        base = {k: v for k, v in ckpt.get("train_args", {}).items() if k in DEFAULTS and k not in MODEL_FLAGS}
        base["preset"] = None
        args = {**DEFAULTS, **base, **given, "out": str(run_dir)}
    else:
        args = {**DEFAULTS, **given}
    args.pop("resume", None)
    return args, ckpt


def resolve_model_config(args: dict, ckpt: dict | None, tokenizer_dir) -> ModelConfig:
    """Preset (or ModelConfig()) + model flags; a resumed run must match its checkpoint's config."""
    if args["preset"] is not None and args["preset"] not in PRESETS:
        raise BadInputError(f"unknown preset {args['preset']!r}: choose one of {', '.join(PRESETS)}")
    if ckpt is not None:
        base = ModelConfig(**ckpt["model_config"])
        if args["preset"] is not None:  # an explicit preset must agree with the checkpoint (vocab aside)
            base = dataclasses.replace(PRESETS[args["preset"]], vocab_size=base.vocab_size)
    else:
        base = PRESETS[args["preset"]] if args["preset"] else ModelConfig()
        if args["vocab_size"] is None and tokenizer_dir is not None:
            base = dataclasses.replace(base, vocab_size=bpe.Tokenizer.from_dir(tokenizer_dir).vocab_size)
    fields = {name: args[name] for name in MODEL_FLAGS if args[name] is not None}
    if args["ffn"] == "silu" and args["d_ff"] is None and ckpt is None:
        fields["d_ff"] = 4 * fields.get("d_model", base.d_model)  # the handout's SiLU FFN: d_ff = 4 * d_model
    cfg = dataclasses.replace(base, **fields)
    try:
        cfg.validate()
    except ValueError as e:
        raise BadInputError(str(e)) from None
    if ckpt is not None and dataclasses.asdict(cfg) != ckpt["model_config"]:
        diff = ", ".join(f"{k} {v} vs {getattr(cfg, k)}" for k, v in ckpt["model_config"].items()
                         if getattr(cfg, k) != v)
        raise BadInputError(f"checkpoint {args['out']}/last.pt has a different model config ({diff}): resume without "
                            f"model flags, or start a new --out")
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
    if args["data"] is None:
        raise BadInputError("--data is required: a .npy of token ids or a `bpe.py prepare` directory "
                            "(or run `python train.py` with no arguments for the offline demo)")


def pick_device(name: str | None, local_rank: int) -> torch.device:
    """--device, else the best available: cuda -> mps -> cpu. Under torchrun each rank takes cuda:LOCAL_RANK."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"--device {name!r} is not a device name (try cuda, cuda:0, mps or cpu)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"--device {name} but CUDA is not available here (torch {torch.__version__}): "
                            f"use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"--device {name} but MPS is not available here: use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def peak_flops(args, device, world_size) -> float | None:
    """MFU denominator (FLOP/s, all ranks): --peak-flops, a published GPU peak, else a measured CPU matmul peak."""
    if args["peak_flops"] is not None:
        return args["peak_flops"] * world_size or None
    dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
    if device.type == "cuda":  # e.g. "NVIDIA H100 80GB HBM3" -> PEAK_FLOPS["h100"]; fp32 matmuls run as TF32 here
        name = torch.cuda.get_device_name(device).lower()
        for gpu in sorted(accounting.PEAK_FLOPS, key=len, reverse=True):  # "h100-pcie" before "h100"
            if all(part in name for part in gpu.split("-")):
                peak = accounting.PEAK_FLOPS[gpu].get("tf32" if args["dtype"] == "fp32" else args["dtype"])
                return peak * world_size if peak else None
        return None
    if device.type == "cpu":  # measured once (about a second); note: shared cores make this, and so MFU, noisy
        return accounting.measure_matmul_flops(device="cpu", dtype=dtype) * world_size
    return None


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


class Stop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of the current step. A second
    Ctrl-C gets the default behaviour (an immediate KeyboardInterrupt)."""

    def __init__(self):
        self.requested = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.requested is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def evaluate(model, data, starts, micro_batch, context_length, device, autocast, vocab_size=None, rank=0,
             world_size=1) -> float:
    """Mean loss over the fixed validation windows `starts`; ranks share the batches and all-reduce the sum."""
    model.eval()
    total = torch.zeros((), device=device)
    chunks = [starts[i:i + micro_batch] for i in range(0, len(starts), micro_batch)]
    for chunk in chunks[rank::world_size]:
        x, y = batch_at(data, chunk, context_length, device, vocab_size)
        with autocast:
            loss = cross_entropy(model(x), y)
        total += loss.float() * len(chunk)  # every window has T targets, so a window-weighted mean is per token
    if world_size > 1:
        dist.all_reduce(total)
    model.train()
    return total.item() / len(starts)  # note: .item() waits for the device (fine: once per evaluation)


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


def train(args: dict, ckpt: dict | None = None) -> Path:
    """Run (or resume) training as `args` say; returns the run directory."""
    # -- processes: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain `python train.py` is rank 0 of 1.
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    check_args(args, world_size)
    device = pick_device(args["device"], local_rank)
    if args["dtype"] is None:
        args["dtype"] = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    train_path, val_path, tokenizer_dir = find_data(args["data"], args["val_data"])
    tokenizer_dir = args["tokenizer"] or (str(tokenizer_dir.resolve()) if tokenizer_dir else None)
    cfg = resolve_model_config(args, ckpt, tokenizer_dir)
    train_data, val_data = open_data(train_path, val_path, cfg.context_length)
    args.update({name: getattr(cfg, name) for name in MODEL_FLAGS}, tokenizer=tokenizer_dir)
    out = Path(args["out"] or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    args["out"] = str(out)
    if ckpt is None and (out / "last.pt").exists() and not args["overwrite"]:
        raise BadInputError(f"{out} already holds a checkpoint: continue it with --resume {out}, or pass "
                            f"--overwrite / a new --out")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # CUDA extra: TF32 tensor cores for the fp32 matmuls
    master = rank == 0

    # -- the model, optimizer, batch stream; then the checkpoint's state over them when resuming.
    torch.manual_seed(args["seed"])
    model = TransformerLM(**dataclasses.asdict(cfg), device=device)
    optimizer = AdamW(model.parameters(), lr=args["lr"], betas=(args["beta1"], args["beta2"]),
                      weight_decay=args["weight_decay"], foreach=True)  # the fused path
    batches = torch.Generator().manual_seed(args["seed"])  # same on every rank: see get_batch
    start, best_val, elapsed, pending_loss, last_log_step = 0, math.inf, 0.0, 0.0, 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, optimizer)
        set_rng_state(ckpt["rng"], batches)
        best_val, elapsed = ckpt["best_val_loss"], ckpt["elapsed"]
        pending_loss, last_log_step = ckpt["pending_loss"]  # train loss summed since the last log line
    fwd_model = torch.compile(model) if args["compile"] else model  # CUDA extra: fused kernels, fewer launches
    train_model = fwd_model
    if world_size > 1:  # gradients all-reduced (averaged) across ranks during backward
        train_model = torch.nn.parallel.DistributedDataParallel(
            fwd_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    # CUDA extra (and CPU with --dtype bf16): matmuls in bfloat16, reductions and weights stay fp32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["dtype"] == "bf16")

    T, accum = cfg.context_length, args["grad_accum"]
    micro = args["batch_size"] // (accum * world_size)  # sequences per rank per forward
    tokens_per_step = args["batch_size"] * T
    cycle = args["cosine_cycle_iters"] or args["max_iters"]
    val_starts = eval_starts(len(val_data), T, args["eval_iters"] * micro * world_size)
    flops_per_token = accounting.train_flops_per_token(cfg, seq_len=T)
    peak = peak_flops(args, device, world_size) if master else None

    # -- run directory (rank 0 only): resolved config, the log (cut back to the checkpoint when resuming).
    log_path = out / "log.jsonl"
    if master:
        out.mkdir(parents=True, exist_ok=True)
        # every resolved flag (model fields included): `--config RUN/config.json --out NEW` repeats this run
        (out / "config.json").write_text(json.dumps(args, indent=2, default=str) + "\n")
        kept = [row for row in read_log(log_path) if row["step"] <= start] if ckpt is not None else []
        log_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{'resuming' if ckpt else 'training'} {n_params / 1e6:.2f}M params on {device} ({args['dtype']}"
              f"{', compiled' if args['compile'] else ''}, {world_size} rank(s)) from step {start} to "
              f"{args['max_iters']}; {tokens_per_step:,} tokens/step; run dir {out}")
    log_file = open(log_path, "a") if master else None

    plain_args = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in args.items()}  # weights_only-loadable

    def log(row: dict) -> None:
        if master:
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

    def save(name: str, step: int) -> None:
        if master:
            save_checkpoint(model, optimizer, step, out / name, model_config=dataclasses.asdict(cfg),
                            train_args=plain_args, rng=rng_state(batches), tokenizer_dir=tokenizer_dir,
                            best_val_loss=best_val, elapsed=time.time() - t0 + elapsed,
                            pending_loss=(loss_sum.item(), last_log_step))

    # Non-finite losses are flagged on the device and looked at (.item(), a sync) only when logging or saving, so
    # no step waits for the GPU; no checkpoint is ever written after a NaN, so last.pt stays the last good one.
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.full((), pending_loss, device=device)  # train loss summed since the last log line
    last_saved = start

    def check_finite(step: int) -> None:
        if nonfinite.item():
            kept = f"{out}/last.pt (step {last_saved}) is the last good checkpoint" if last_saved else "no checkpoint"
            raise FloatingPointError(f"loss became nan/inf by step {step} (lr {lr:.2e}): the learning rate is "
                                     f"probably too high, try --lr {args['lr'] / 10:g}; {kept}")

    def validation_loss() -> float:
        return evaluate(fwd_model, val_data, val_starts, micro, T, device, autocast, cfg.vocab_size, rank, world_size)

    stop = Stop()
    t0 = t_log = time.time()
    lr = cosine_lr(start, args["lr"], args["min_lr"], args["warmup_iters"], cycle)
    try:
        if start == 0:  # step 0: the loss of the untrained model (about ln V) anchors every curve
            val = validation_loss()
            log({"step": 0, "lr": lr, "tokens": 0, "time": round(elapsed, 3), "val_loss": val,
                 "val_ppl": math.exp(min(val, 50))})
            if master:
                print(f"step 0 | val loss {val:.4f} | val ppl {math.exp(min(val, 50)):.1f}")
            t_log = time.time()
        for step in range(start + 1, args["max_iters"] + 1):  # `step` = number of optimizer updates after this one
            # The algorithm: lr from the schedule; per micro-batch: batch, forward, loss, backward; clip; step.
            lr = cosine_lr(step - 1, args["lr"], args["min_lr"], args["warmup_iters"], cycle)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for i in range(accum):
                x, y = get_batch(train_data, micro, T, device, batches, vocab_size=cfg.vocab_size,
                                 rank=rank, world_size=world_size)
                # DDP: all-reduce gradients only on the last micro-batch of the step
                sync = train_model.no_sync() if world_size > 1 and i < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss = cross_entropy(train_model(x), y)
                    (loss / accum).backward()  # / accum: the sum of micro-gradients is the mean over the batch
                loss = loss.detach()
                loss_sum += loss / accum
                nonfinite |= ~torch.isfinite(loss)
            grad_norm = clip_grad_norm(model.parameters(), args["grad_clip"] or math.inf)  # 0-dim tensor: no sync
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            is_eval = step % args["eval_interval"] == 0 or step == args["max_iters"]
            is_log = step % args["log_interval"] == 0 or is_eval
            stopping = stop.requested is not None and (world_size == 1 or is_log)
            if world_size > 1 and is_log:  # ranks agree to stop at a log step, so no rank waits in an all-reduce
                flag = torch.tensor(float(stop.requested is not None), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if is_log:
                if world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world_size
                    nonfinite |= ~torch.isfinite(loss_sum)  # so every rank stops at the same step
                check_finite(step)
                steps_since = step - last_log_step
                dt = time.time() - t_log
                train_loss = loss_sum.item() / steps_since  # note: .item() syncs with the device; only here
                tok_s = tokens_per_step * steps_since / dt
                row = {"step": step, "loss": train_loss, "lr": lr, "grad_norm": float(grad_norm),
                       "tokens": step * tokens_per_step, "time": round(time.time() - t0 + elapsed, 3),
                       "ms_per_step": 1000 * dt / steps_since, "tokens_per_s": tok_s}
                if peak:
                    row["mfu"] = tok_s * flops_per_token / peak
                line = (f"step {step} | loss {train_loss:.4f} | lr {lr:.2e} | grad {float(grad_norm):.3f} | "
                        f"{row['ms_per_step']:.1f} ms/step | {tok_s:,.0f} tok/s"
                        + (f" | MFU {100 * row['mfu']:.1f}%" if peak else ""))
                loss_sum.zero_()
                last_log_step = step
                if is_eval:
                    val = validation_loss()
                    row.update(val_loss=val, val_ppl=math.exp(min(val, 50)))
                    line += f" | val loss {val:.4f} | val ppl {row['val_ppl']:.1f}"
                    if val < best_val:
                        best_val = val
                        save("best.pt", step)
                        line += " | best"
                log(row)
                if master:
                    print(line, flush=True)
            if step % args["ckpt_interval"] == 0 or step == args["max_iters"] or stopping:
                check_finite(step)
                save("last.pt", step)
                last_saved = step
            if is_log:
                t_log = time.time()  # ms/step and tokens/s exclude evaluation and checkpoint time
            if stopping:
                if master:
                    print(f"{stop.requested}: saved {out}/last.pt at step {step}; continue with "
                          f"`python train.py --resume {out}`")
                break
    finally:
        stop.restore()
        if log_file:
            log_file.close()
        if world_size > 1:
            dist.destroy_process_group()
    return out


def train_main(argv) -> Path:
    args, ckpt = resolve_args(argv)
    return train(args, ckpt)


# ---------------------------------------------------------------------------------------------------------------
# Plots: python train.py plot RUN_DIR... -o curves.png
# ---------------------------------------------------------------------------------------------------------------


def plot(run_dirs, out_png) -> None:
    """Train (solid) and validation (dashed) loss against optimizer step and wall-clock time, one colour per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError("plotting needs matplotlib: pip install matplotlib") from None
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
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")


def plot_main(argv) -> None:
    p = OneLineParser(prog="train.py plot", description="loss curves of one or more run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    a = p.parse_args(argv)
    plot(a.runs, a.out)


# ---------------------------------------------------------------------------------------------------------------
# The offline demo: python train.py
# ---------------------------------------------------------------------------------------------------------------
# The whole stack on a corpus every Python installation carries: the documentation topics of the `help()`
# system (pydoc_data.topics, about 465K characters of English about Python). Each hop is one named function:
# bpe.train_bpe -> Tokenizer.save_dir -> bpe.encode_file -> train() -> sample.load_model -> sample.generate.

DEMO = {  # full: a few minutes on 2 CPU cores; quick: seconds, for CI
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
    import sample  # imported here: sample.py may import train.py's checkpoint helpers
    setting = DEMO["quick" if quick else "full"]
    t_start = time.time()
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    data_dir.mkdir(parents=True, exist_ok=True)

    # 1. corpus: one document per help topic, in a fixed order; the last tenth is the validation split.
    docs = [topics[k].strip() for k in sorted(topics)][:setting["docs"]]
    n_valid = max(1, len(docs) // 10)
    for name, split in (("train.txt", docs[:-n_valid]), ("valid.txt", docs[-n_valid:])):
        (data_dir / name).write_text("".join(doc + bpe.END_OF_TEXT for doc in split))
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
                          eos_id=tok.encode(bpe.END_OF_TEXT)[0], generator=torch.Generator().manual_seed(0))
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("plot", "demo") else "train"
    try:
        if command == "plot":
            plot_main(argv[1:])
        elif command == "demo" or not argv:
            demo_main(argv[1:])
        else:
            train_main(argv)
    except BadInputError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
