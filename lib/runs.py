"""lib/runs.py: a training run of train.py: flags, --config and --resume; the run directory, its log and checkpoints;
stopping on a signal.

train.py's loop reads as the algorithm (lr, batch, forward, loss, backward, clip, step) over three small records
defined here: `Run` (what stays fixed), `Trainer` (the objects a step uses) and `Progress` (what the steps change).
Everything around the loop is here too: resolving the flags (command line > --config FILE.json > the resumed
checkpoint > DEFAULTS), opening the data and the run directory, log.jsonl and Weights & Biases, last.pt / best.pt
with a clean stop (never a torn file) when the disk fills, and Ctrl-C / SIGTERM handling.

    python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m
    python train.py --resume runs/ts17m                    # continue exactly where it stopped (Ctrl-C saves first)
    python train.py --resume runs/ts17m/best.pt            # continue the run from its best.pt instead
    python train.py --config runs/ts17m/config.json --out runs/again   # the same flags again
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
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
import train
from train import eval_starts, load_tokens
from lib import cli
from lib.checkpoints import (AUTOCAST_DTYPES, check_same_model, check_tokenizer, checkpoint_config, checkpoint_dict,
                             checkpoint_file_bytes, link_or_copy, note_if_unverified, pick_device, pick_dtype,
                             read_checkpoint, read_tokenizer, rng_state, write_checkpoint_file)
from lib.cli import (BadInputError, EnvironmentFault, OneLineParser, WriteFault, atomic_file, describe_fault,
                     space_problem)
from lib.distributed import full_state, process_ranks
from model import ATTN_IMPLS, FFNS, NORMS, POSITIONS, PRESETS, ModelConfig, TransformerLM
from optim import AdamW, cosine_lr


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
    peak_flops=None, out=None, overwrite=False, init_from=None, wandb=None, wandb_run=None, plain=False,
)


def build_parser() -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: the namespace holds only the flags actually given, the top layer of resolution.
    p = OneLineParser(prog="train.py", description=train.__doc__, argument_default=argparse.SUPPRESS,
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
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt (RUN_DIR/best.pt: from that "
                                          "checkpoint instead)")
    a("--init-from", metavar="CKPT", help="a new run that starts from CKPT's weights (fresh optimizer, schedule and "
                                          "step; the model config is CKPT's), e.g. to fine-tune an imported model")
    a("--overwrite", action=argparse.BooleanOptionalAction, help="start afresh in an --out that has a checkpoint")
    a("--config", metavar="FILE.json", help="defaults for any flag (keys are flag names); command line wins")
    a = p.add_argument_group("hardware").add_argument
    a("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    a("--dtype", choices=list(AUTOCAST_DTYPES) + ["fp32"],
      help="autocast precision (default: bf16 on a GPU with native bf16, fp16 on one without, fp32 on CPU)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (the fast or the --plain one)")
    a("--plain", action=argparse.BooleanOptionalAction,
      help="train with the chapters' readable code only (no fused kernels, no fused AdamW): slower, for stepping "
           "through in a debugger, and the reference run")
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
    actions = {action.dest: action for action in parser._actions}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS:
            raise BadInputError(f"--config {path}: unknown key {key!r} (keys are flag names such as 'd_model')")
        problem = config_value_problem(actions[name], value) if name in actions else None
        if problem:
            raise BadInputError(f"--config {path}: {key} {problem}")
        out[name] = value
    return out


def config_value_problem(action: argparse.Action, value) -> str | None:
    """Why a --config value cannot stand for its flag (None if it can): the command line's types and choices, and
    a switch only as JSON true or false (the string "false" would be taken as true)."""
    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        return None if isinstance(value, bool) else f"must be JSON true or false, got {value!r}"
    if action.type in (int, float):
        not_a_number = isinstance(value, bool) or not isinstance(value, (int, float))
        if not_a_number or (action.type is int and value != int(value)):
            return "must be an integer" if action.type is int else "must be a number"
    elif not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if action.choices and value not in action.choices:
        return f"must be one of {', '.join(action.choices)}, got {value!r}"
    return None


def resolve_args(argv) -> tuple[dict, dict | None]:
    """Flags -> (resolved args, checkpoint being resumed or None)."""
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    config = read_config_file(cli["config"], parser) if "config" in cli else {}
    given = {**config, **cli}  # command line wins over the JSON file
    given.pop("config", None)
    ckpt = None
    if given.get("resume"):
        if given.get("init_from"):
            raise BadInputError("--init-from starts a new run and --resume continues one: give only one of them")
        run_dir, path = resume_paths(given["resume"])
        ckpt = read_checkpoint(path, corrupt_hint=lambda: other_checkpoint_hint(path))
        ckpt["read_from"] = str(path)  # for messages: RUN/last.pt, or RUN/best.pt (in memory only; never saved)
        check_same_model(ckpt, path)  # not another run's last.pt copied in
        if "rng" not in ckpt:  # e.g. one that train.py import wrote
            raise BadInputError(f"--resume {given['resume']}: {path} holds weights but no training state; "
                                f"start a new run from it with --init-from {path}")
        base = {k: v for k, v in ckpt.get("train_args", {}).items() if k in DEFAULTS and k not in MODEL_FLAGS}
        base["preset"] = None
        args = {**DEFAULTS, **base, **given, "out": str(run_dir)}
    else:
        args = {**DEFAULTS, **given}
    args.pop("resume", None)
    return args, ckpt


def resume_paths(arg) -> tuple[Path, Path]:
    """--resume RUN (its last.pt) or --resume RUN/NAME.pt (another checkpoint of the run, e.g. best.pt when last.pt
    is damaged) -> (the run directory, the checkpoint to continue from)."""
    path = Path(arg)
    if path.is_file():
        if not (path.parent / "config.json").is_file():
            raise BadInputError(f"--resume {path}: {path.parent} is not a run directory (no config.json); start a "
                                f"new run from this checkpoint's weights with --init-from {path}")
        return path.parent, path
    if not (path / "last.pt").is_file():
        raise BadInputError(f"--resume {path}: no checkpoint {path / 'last.pt'} to resume from")
    return path, path / "last.pt"


def other_checkpoint_hint(damaged: Path) -> str:
    """What to do when the checkpoint --resume reads is damaged: continue from the run's other one (best.pt for
    last.pt, and back) if that is intact. Not always: best.pt is a hard link of last.pt when they hold the same
    step, and is then damaged with it."""
    for other in (damaged.with_name(name) for name in ("last.pt", "best.pt") if name != damaged.name):
        if other.is_file():
            with contextlib.suppress(BadInputError):
                step = read_checkpoint(other)["iteration"]
                return f"{other} (step {step}) is intact: continue from it with `python train.py --resume {other}`"
    return (f"no intact checkpoint is left to resume: start the run again with `python train.py --config "
            f"{damaged.parent / 'config.json'} --overwrite`")


def resolve_model_config(args: dict, ckpt: dict | None, tokenizer_dir, init: dict | None = None) -> ModelConfig:
    """Preset (or ModelConfig()) + model flags; a resumed run must match its checkpoint's config, and an
    --init-from run (`init`, the checkpoint it starts from) that checkpoint's."""
    if args["preset"] is not None and args["preset"] not in PRESETS:
        raise BadInputError(f"unknown preset {args['preset']!r}: choose one of {', '.join(PRESETS)}")
    source = ckpt if ckpt is not None else init  # the checkpoint whose model this run continues, if any
    where = ckpt["read_from"] if ckpt is not None else args["init_from"]
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
    for name in ("wandb", "wandb_run"):  # an empty name would log to W&B's default project, or nowhere
        if args[name] is not None and not args[name].strip():
            raise BadInputError(f"--{name.replace('_', '-')} names a W&B {'project' if name == 'wandb' else 'run'}: "
                                f"got {args[name]!r}; give a name (e.g. --wandb cs336), or leave the flag out")
    if args["wandb"] is not None:
        cli.optional_import("wandb", "wandb", "--wandb")  # a missing package fails now, before any work
    if args["data"] is None:
        raise BadInputError("--data is required: a .npy of token ids or a `bpe.py prepare` directory "
                            "(or run `python train.py` with no arguments for the offline demo)")
    blocker = file_in_the_way(Path(args["out"])) if args["out"] is not None else None
    if blocker is not None:  # found now, not when the run directory is made after the data and model are ready
        where = f"--out {blocker}" if blocker == Path(args["out"]) else f"--out {args['out']}: {blocker}"
        raise BadInputError(f"{where} is a file, not a directory; pick another --out (a directory, made if missing)")


def file_in_the_way(path: Path) -> Path | None:
    """The file that keeps `path` from being (or being made) a directory: path itself or an ancestor; else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def peak_flops(args, device, world_size) -> float | None:
    """MFU denominator (FLOP/s, all ranks): --peak-flops, a published GPU peak, else a measured CPU matmul peak."""
    if args["peak_flops"] is not None:
        return args["peak_flops"] * world_size or None
    if device.type == "cuda":  # the datasheet figure for this GPU's name (fp32 matmuls run as TF32 here)
        peak = accounting.gpu_peak_flops(torch.cuda.get_device_name(device), args["dtype"])
        return peak * world_size if peak else None
    if device.type == "cpu":  # measured once (about a second); note: shared cores make this, and so MFU, noisy
        dtype = AUTOCAST_DTYPES.get(args["dtype"], torch.float32)
        from lib.measure import measure_matmul_flops
        return measure_matmul_flops(device="cpu", dtype=dtype) * world_size
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
    def fast(self) -> bool:
        return not self.args["plain"]  # the speed layer (lib/kernels.py, lib/fused_optim.py), unless --plain

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
    first_step_nonfinite: torch.Tensor | None = None  # device flag: ... at this process's first step (no update yet)
    start_step: int = 0                 # the step this process started from (0, or the resumed checkpoint's)
    checkpoint_size: int = 0            # bytes the next checkpoint needs (the last one's size, or an estimate)
    space_warned: bool = False          # the "next checkpoint will not fit" warning is given once

    CHECKPOINTED = ("step", "best_val_loss", "elapsed", "last_log_step", "last_saved_step", "loss_sum",
                    "skipped_steps")

    def begin(self, device: torch.device) -> "Progress":
        """Start the clocks and put the loss accumulators on the device."""
        self.loss_sum = torch.full((), float(self.loss_sum), device=device)
        self.skipped_steps = torch.full((), int(self.skipped_steps), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step_nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.start_step = self.step
        self.started = self.last_log_time = time.time()
        return self

    def seconds(self) -> float:
        """Training time so far, over every process of the run (resumes add up)."""
        return self.elapsed + time.time() - self.started

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)
        if self.step == self.start_step:  # the first step's loss comes from the starting weights: kept apart
            self.first_step_nonfinite |= ~torch.isfinite(loss)

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
# Setting a run up: processes and device, data, the run directory
# ---------------------------------------------------------------------------------------------------------------


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
    if ckpt is not None or init is not None:  # the model's tokenizer: the checkpoint's, checked
        where = ckpt["read_from"] if ckpt is not None else args["init_from"]
        args["tokenizer"] = continued_tokenizer(ckpt if ckpt is not None else init, args["tokenizer"],
                                                found_tokenizer, where)
    elif args["tokenizer"] is None and found_tokenizer is not None:
        args["tokenizer"] = str(found_tokenizer.resolve())
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


def continued_tokenizer(ckpt: dict, given: str | None, found: Path | None, src) -> str | None:
    """The tokenizer of a run that continues a checkpoint's model (--resume, --init-from): --tokenizer, else the
    checkpoint's own directory, else the one beside the data. The one taken and the one beside the data must both be
    the checkpoint's tokenizer (lib/checkpoints.check_tokenizer): the data's ids and the model's embedding rows must
    mean the same tokens. (On --resume, `given` is the run's recorded --tokenizer: the checkpoint's own.)"""
    theirs = ckpt.get("tokenizer_dir")
    own = theirs if theirs is not None and Path(theirs).is_dir() else None
    candidates = {}  # where it came from -> directory
    if given is not None and given != theirs:
        candidates["--tokenizer"] = given
    elif own is not None:
        candidates["the checkpoint's tokenizer_dir"] = own
    if found is not None and all(found.resolve() != Path(c).resolve() for c in candidates.values()):
        candidates["the data directory"] = found  # the data's ids are that tokenizer's
    for named_by, directory in candidates.items():
        check_tokenizer(ckpt, src, read_tokenizer(directory, named_by), directory, named_by)
    chosen = candidates.get("--tokenizer") or own or (str(found.resolve()) if found is not None else theirs)
    note_if_unverified(ckpt, src, chosen)
    return chosen


RUN_FILES = ("config.json", "log.jsonl", "last.pt", "best.pt",  # all a run writes into its directory (config first)
             "log.jsonl.damaged")  # log rows that could not be read when it was resumed (see keep_log_rows)


def remove_debris(out: Path) -> None:
    """Remove the partial writes a killed run left (SIGKILL, power loss): NAME.tmp for the run's own files only, and
    only in a run directory (one holding config.json). Any other *.tmp in the directory is someone else's: kept."""
    if not (out / "config.json").is_file():
        return
    for debris in (out / f"{name}.tmp" for name in RUN_FILES):
        if debris.is_file():
            debris.unlink()
            print(f"removed {debris}: a partial write left by an interrupted run (the file it was replacing is intact)")


def open_run_dir(run: Run, progress: Progress, model: TransformerLM, resumed: bool) -> "RunLog":
    """Make the run directory, clear the debris of an interrupted write, write config.json, cut log.jsonl back to
    the checkpoint's step when resuming, print the header line (rank 0); return the run's RunLog. Until the run's
    first step is done, RunLog.abandon puts the directory back as it was: a run that fails early leaves nothing."""
    if not run.master:
        return RunLog(run, progress)
    changes = DirectoryChanges(run.out)
    try:
        changes.make_dir()
        remove_debris(run.out)
        # every resolved flag (model fields included): `--config RUN/config.json --out NEW` repeats this run
        changes.write("config.json", json.dumps(run.args, indent=2, default=str) + "\n")
        kept = keep_log_rows(run.out, progress.step, changes) if resumed else []
        changes.write("log.jsonl", "".join(json.dumps(row) + "\n" for row in kept))
        if run.args["wandb"]:
            changes.will_make("wandb")  # W&B's own directory, RUN/wandb
        log = RunLog(run, progress, changes)
    except BaseException:
        changes.undo()
        raise
    n_params = sum(p.numel() for p in model.parameters())
    a = run.args
    print(f"{'resuming' if resumed else 'training'} {n_params / 1e6:.2f}M params on {run.device} ({a['dtype']}"
          f"{', compiled' if a['compile'] else ''}{', FSDP' if a['fsdp'] else ''}, {run.world_size} rank(s)) from step "
          f"{progress.step} to {a['max_iters']}; {run.tokens_per_step:,} tokens/step; run dir {run.out}")
    return log


def keep_log_rows(out: Path, step: int, changes: "DirectoryChanges") -> list[dict]:
    """A resumed run's log rows up to its checkpoint's step (the later ones are redone). Damaged lines do not stop
    the run: they are moved, as they were, to log.jsonl.damaged (added to what an earlier resume put there), and
    reported in one line once the run has taken a step (until then a failure puts them back)."""
    path = out / "log.jsonl"
    rows, damaged = parse_log(path)
    if damaged:
        aside = out / "log.jsonl.damaged"
        earlier = aside.read_bytes() if aside.is_file() else b""
        changes.write(aside.name, earlier + b"".join(line + b"\n" for _, line in damaged))
        changes.notes.append(f"train.py: warning: {path}: {len(damaged)} damaged row{'s' * (len(damaged) > 1)} "
                             f"({line_numbers(damaged)}) moved to {aside}; the run resumed from its checkpoint")
    return [row for row in rows if row["step"] <= step]


class DirectoryChanges:
    """What this invocation made or rewrote in the run directory, so a run that fails before its first step can
    leave it as it found it: the directories it made, and each file it wrote with the bytes it had before (None:
    it is new). Only names the run writes are ever removed or put back; nothing else in the directory is touched.
    `notes`: warnings about the changes, true only if they stay (RunLog prints them once the run has taken a step)."""

    def __init__(self, out: Path):
        self.out, self.made, self.before, self.notes = out, None, {}, []

    def report(self) -> None:
        for note in self.notes:
            print(note, file=sys.stderr)
        self.notes = []

    def make_dir(self) -> None:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # (a file in the way was refused earlier, in check_args)
            raise EnvironmentFault(f"cannot make the run directory {self.out}: {describe_fault(e, self.out)}; "
                                   f"pick another --out") from None
        self.made = missing[-1] if missing else None

    def write(self, name: str, content: str | bytes) -> None:
        path = self.out / name
        if name not in self.before:
            self.before[name] = path.read_bytes() if path.is_file() else None
        atomic_write_bytes(path, content.encode("utf-8") if isinstance(content, str) else content)

    def will_make(self, name: str) -> None:
        """A file or directory another writer is about to make (W&B's); removed by undo if it is new."""
        if not (self.out / name).exists():
            self.before[name] = None

    def undo(self) -> None:
        """Put back every file as it was, remove what is new, then the directories made (if nothing else is in
        them). Best effort: the error that ended the run is the one reported."""
        self.notes = []
        for name, old in self.before.items():
            path = self.out / name
            with contextlib.suppress(OSError):
                if old is not None:
                    atomic_write_bytes(path, old)
                elif path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        if self.made is not None:
            for d in (self.out, *self.out.parents):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only an empty directory: anything someone else put there stays
                if d == self.made:
                    break


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path, needed=len(data)) as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------------------------
# Logging: log.jsonl, the console, W&B
# ---------------------------------------------------------------------------------------------------------------


class RunLog:
    """Rank 0's log.jsonl, one JSON row per logged step, and the console line of each row.

    A row that cannot be written (a full disk, an I/O error) is reported once and training goes on: the log is a
    record, the checkpoints are the work. The console line is still printed; log.jsonl lacks the rows from there on
    (read_log tolerates a torn last line). Whether the checkpoints can still be written is checked by the caller.
    With --wandb every row also goes to a Weights & Biases run, which gets the resolved flags as its config.
    `changes`: what open_run_dir did to the run directory, undone by abandon() if the run fails before a step."""

    def __init__(self, run: Run, progress: Progress, changes: DirectoryChanges | None = None):
        self.run, self.progress, self.changes = run, progress, changes
        self.first_step = progress.step  # where this process starts
        self.path = run.out / "log.jsonl"
        self.wandb = start_wandb(run) if run.master and run.args["wandb"] else None
        self.file = cli.open_for_append(self.path) if run.master else None  # (cli.: a seam for fault tests)
        self.failed = None  # the first write error, once there was one

    def write(self, row: dict, suffix: str = "") -> None:
        if not self.run.master:
            return
        self.report_changes()
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

    def report_changes(self) -> None:
        """open_run_dir's warnings, once they hold: after the first step (before it, abandon() undoes the changes)."""
        if self.changes is not None and self.progress.step > self.first_step:
            self.changes.report()

    def close(self) -> None:
        self.report_changes()
        if self.file is not None:
            with contextlib.suppress(OSError):  # a failed flush was reported already
                self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.file = self.wandb = None

    def abandon(self) -> None:
        """After an error: a run that has not finished a step leaves the run directory as it found it (no new
        config.json, log.jsonl or directory; a resumed run's files as they were). Later, the log is the record."""
        if self.changes is not None and self.progress.step == self.first_step:
            self.close()
            self.changes.undo()


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


def check_finite(run: Run, progress: Progress, lr: float) -> None:
    """Stop with FloatingPointError once a loss was nan/inf. The flag is read (.item(), a sync) only when logging
    or saving, so no step waits for the GPU; no checkpoint is written after a NaN, so last.pt is the last good one."""
    if progress.nonfinite.item():
        raise FloatingPointError(nonfinite_cause(run, progress, lr))


def nonfinite_cause(run: Run, progress: Progress, lr: float) -> str:
    """What a nan/inf loss says, and what to do: only an update at lr > 0 can turn finite weights into ones that
    give nan. A loss that was nan before any update (or with every update at lr 0) points at the starting weights
    or the data; a lower --lr would not help."""
    if progress.first_step_nonfinite.item():
        when = f"the loss was nan/inf at step {progress.start_step + 1}, before any update"
    elif not any(run.lr_at(it) > 0 for it in range(progress.start_step, progress.step)):
        when = f"the loss became nan/inf by step {progress.step} with every update at lr 0"
    else:
        kept = (f"{run.out}/last.pt (step {progress.last_saved_step}) is the last good checkpoint"
                if progress.last_saved_step else "no checkpoint")
        return (f"loss became nan/inf by step {progress.step} (lr {lr:.2e}): the learning rate is probably too "
                f"high, try --lr {run.args['lr'] / 10:g}; {kept}")
    weights = (f"the checkpoint resumed at step {progress.start_step}" if progress.start_step else
               f"--init-from {run.args['init_from']}" if run.args["init_from"] else "a fresh initialisation")
    return f"{when}: the starting weights ({weights}) or the data are bad, not the learning rate"


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


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run logs a large finite number (JSON has no inf)."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


MAX_LOG_PERPLEXITY = 50  # exp(50) ≈ 5e21: far above any real perplexity (ln of a 50K vocabulary is 10.8)


def read_log(path) -> list[dict]:
    """The readable rows of a log.jsonl (see parse_log; the damaged ones are left out)."""
    return parse_log(path)[0]


def parse_log(path) -> tuple[list[dict], list[tuple[int, bytes]]]:
    """log.jsonl -> (its rows, its damaged lines as (line number, bytes)). A row is a JSON object of numbers with
    an integer "step", as RunLog writes them; any other line is damaged (garbage, a value that is not a number,
    bytes that are not UTF-8), except a torn last line without its newline (a process killed mid-append): that
    one is dropped. The log is a record, never needed to train: callers report the damaged lines, not fail."""
    path = Path(path)
    if not path.is_file():
        return [], []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise EnvironmentFault(f"cannot read {path}: {describe_fault(e, path)}") from None
    torn = lines.pop()  # b"" when the file ends with a newline, as every complete append does
    rows, damaged = [], []
    for number, line in enumerate(lines, 1):
        row = parse_row(line)
        if row is not None:
            rows.append(row)
        elif line.strip():  # (a blank line holds nothing to keep)
            damaged.append((number, line))
    last = parse_row(torn)
    if last is not None:  # a whole row that only lacks its newline
        rows.append(last)
    return rows, damaged


def parse_row(line: bytes) -> dict | None:
    """One line of log.jsonl as a row, or None if it is not one."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not (isinstance(row, dict) and all(is_number(v) for v in row.values()) and isinstance(row.get("step"), int)):
        return None
    return row


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # (True is an int to Python)


def line_numbers(damaged: list[tuple[int, bytes]], shown: int = 5) -> str:
    """'line 4' or 'lines 4, 9, 12 and 3 more': where the damaged lines are, short enough for one line."""
    return f"line{'s' * (len(damaged) > 1)} {cli.some_of([n for n, _ in damaged], shown)}"


# ---------------------------------------------------------------------------------------------------------------
# A run's checkpoints: last.pt, best.pt, and room for the next one
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Stopping: Ctrl-C / SIGTERM
# ---------------------------------------------------------------------------------------------------------------


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
