"""lib/checkpoints.py: checkpoint files, for train.py and sample.py (CS336 §5.2 "Checkpointing", the operations).

train.py's `save_checkpoint` / `load_checkpoint` are the handout's two functions; this module holds what a real run's
files need on top: the one torch.load of the project (weights_only=True), one-line errors for a missing, corrupt or
foreign file, the model config and tokenizer a checkpoint names, file sizes (a checkpoint that will not fit is
refused before a byte is written), the random streams exact resume needs, best.pt as a hard link of last.pt, and the
device a checkpoint runs on. sample.py reads checkpoints through here, so it needs nothing from train.py.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so it loads with
torch.load(weights_only=True) and sample.py can rebuild model and tokenizer from it alone:
  model (state dict), optimizer (state dict), iteration (optimizer steps done), model_config (asdict(ModelConfig)),
  tokenizer_dir (str or None), and for exact resume: train_args (the resolved flags), rng (RNG states), scaler and
  progress (the loop's bookkeeping, Progress.state_dict()). `read_checkpoint` is the one place a checkpoint is
  read from disk; train.py's resume, sample.py and the tests all go through it.
"""
import contextlib
import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import bpe
from lib.cli import QUOTED_ERROR_CHARS, BadInputError, atomic_file, error_summary
from model import ModelConfig


# ---------------------------------------------------------------------------------------------------------------
# Writing: the dict, its size, an atomic file
# ---------------------------------------------------------------------------------------------------------------


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


def checkpoint_dict(model_state: dict, optimizer_state: dict | None, iteration: int, model_config=None,
                    tokenizer_dir: str | None = None, **extra) -> dict:
    """What a checkpoint holds (see the banner): state dicts, the iteration, model config, tokenizer and `extra`."""
    ckpt = {"model": model_state, "optimizer": optimizer_state, "iteration": int(iteration),
            "tokenizer_dir": tokenizer_dir}
    if model_config is not None:
        ckpt["model_config"] = dataclasses.asdict(model_config)
    return ckpt | extra


def write_checkpoint_file(ckpt: dict, out) -> None:
    """torch.save to a file object, or to a path through cli.atomic_file: to out.tmp, flushed, then os.replace()d
    over `out`, after checking that it fits (a full disk or an I/O error raises cli.WriteFault naming the file)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Reading: weights_only, one-line errors, the config and tokenizer a checkpoint names
# ---------------------------------------------------------------------------------------------------------------


def load_weights_only(src):
    """The one torch.load of the project: onto the CPU, weights_only=True (tensors and plain values only, so loading
    a file cannot run code), for checkpoints and for a Hugging Face pytorch_model.bin alike."""
    return torch.load(src, map_location="cpu", weights_only=True)


def read_checkpoint(src, corrupt_hint=None) -> dict:
    """torch.load(weights_only=True) onto the CPU, with a one-line BadInputError for a missing or corrupt file, or
    one that is not a checkpoint of this project (it needs at least "model" and "iteration"). corrupt_hint: a
    function giving what to do about a corrupt file (called only then: --resume's reads the other checkpoint)."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise BadInputError(f"checkpoint {src} does not exist: pass a .pt file train.py wrote (e.g. RUN/last.pt)")
    try:
        ckpt = load_weights_only(src)
    except Exception as e:  # truncated, not a torch file, or a pickle that is more than tensors and plain values
        hint = corrupt_hint() if corrupt_hint else other_checkpoint_note(src)
        raise BadInputError(f"checkpoint {src} is corrupt or not a train.py checkpoint ({error_summary(e)}); "
                            f"{hint}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "iteration" not in ckpt:
        raise BadInputError(f"checkpoint {src} is not a train.py checkpoint (no 'model'/'iteration' entries)")
    return ckpt


def other_checkpoint_note(damaged) -> str:
    """The fix for a corrupt checkpoint where no flag resumes a run: point at the run's other checkpoint, if any."""
    if isinstance(damaged, (str, os.PathLike)) and Path(damaged).name in ("last.pt", "best.pt"):
        other = Path(damaged).with_name("best.pt" if Path(damaged).name == "last.pt" else "last.pt")
        if other.is_file():
            return f"{other} may be intact: pass that one"
    return "pass a checkpoint train.py wrote (RUN/last.pt or RUN/best.pt)"


def checkpoint_config(ckpt: dict, src) -> ModelConfig:
    """The ModelConfig a checkpoint's weights were made with, or a BadInputError saying why there is none."""
    if "model_config" not in ckpt:
        raise BadInputError(f"checkpoint {src} has no 'model_config' entry: not written by train.py")
    unknown = sorted(set(ckpt["model_config"]) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise BadInputError(f"checkpoint {src}: model_config has unknown fields {unknown}; was it written by a newer "
                            f"model.py?")
    return ModelConfig(**ckpt["model_config"])


def checkpoint_tokenizer(ckpt: dict, tokenizer_dir, vocab_size: int, fast: bool = False) -> bpe.Tokenizer | None:
    """--tokenizer DIR, else the directory the checkpoint names, else None (the model then works on ids only).
    sample.py and train.py export read a checkpoint's tokenizer through here (fast: the fast encoder)."""
    source = "the tokenizer_dir argument (--tokenizer)" if tokenizer_dir is not None else "the checkpoint"
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else ckpt.get("tokenizer_dir")
    if tokenizer_dir is None:
        return None
    tok_path = Path(tokenizer_dir)
    if not ((tok_path / "vocab.json").is_file() and (tok_path / "merges.txt").is_file()):
        raise BadInputError(f"tokenizer directory {tok_path} (named by {source}) has no vocab.json and "
                            "merges.txt: pass --tokenizer DIR (a directory bpe.py train/prepare wrote)")
    tokenizer = bpe.Tokenizer.from_dir(tok_path, fast=fast)
    if tokenizer.vocab_size > vocab_size:
        raise BadInputError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but the model only "
                            f"{vocab_size}: wrong --tokenizer for this checkpoint?")
    return tokenizer


def load_weights(model: torch.nn.Module, ckpt: dict, where) -> None:
    """ckpt["model"] into `model` (its wrappers unwrapped); weights that do not fit are a BadInputError naming the
    checkpoint (`where`) and the first mismatch."""
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BadInputError(f"checkpoint {where}: weights do not match the model "
                            f"({str(e).strip().splitlines()[-1].strip()[:QUOTED_ERROR_CHARS]})") from None


# ---------------------------------------------------------------------------------------------------------------
# Exact resume: every random stream
# ---------------------------------------------------------------------------------------------------------------


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
# The device and precision a checkpoint runs on
# ---------------------------------------------------------------------------------------------------------------


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
