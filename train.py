"""train.py: the training loop of a Transformer LM (CS336 assignment 1, §5 "Training loop" and §7 "Experiments").

Read top to bottom, it is the handout's §5 in the order the data flows: token ids on disk, memory-mapped
(`load_tokens`) -> random windows of them as (x, y) batches (`get_batch`) -> the handout's `save_checkpoint` /
`load_checkpoint` -> the model and optimizer (`build_trainer`) -> one optimizer step (`train_step`: lr from the
schedule, batch, forward, loss, backward, clip, step) -> the loop (`train`) -> evaluation on fixed validation windows
(`evaluate`) -> `main`. The model is model.py's, AdamW, cross-entropy, the cosine schedule and clipping are optim.py's.

By default it takes the speed layer (TransformerLM(fast=True), fused AdamW with the clipping folded into its kernel,
the chunked cross-entropy); `--plain` trains with the chapters' readable code only, to step through in a debugger.
Everything a reader can skip is in lib/: flags, --config, --resume, the run directory, log and signals (runs.py),
checkpoint files (checkpoints.py), torchrun's DDP / FSDP2 (distributed.py), Hugging Face export / import
(hf_export.py), the offline demo and `plot` (demo.py).

    python train.py                                        # offline demo: BPE, encode, train, sample (CPU)
    python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m   # --resume runs/ts17m
    torchrun --nproc_per_node 8 train.py --data data/owt --preset ts17m --batch-size 256 --compile
"""
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lib.batches import batch_at
from lib.cli import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, BadInputError, EnvironmentFault
from lib.fused_optim import clip_divisor
from model import TransformerLM
from optim import AdamW, clip_grad_norm, cross_entropy


# ---------------------------------------------------------------------------------------------------------------
# Data: token ids on disk -> (x, y) batches
# ---------------------------------------------------------------------------------------------------------------
# A dataset is a 1-D array of token ids saved by lib/datasets.encode_file (`bpe.py encode`; np.save format, uint16, or uint32 for vocabularies
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
                            f"token ids as written by `bpe.py encode`")
    return data


def get_batch(data, batch_size: int, context_length: int, device, generator: torch.Generator | None = None, *,
              vocab_size: int | None = None, rank: int = 0, world_size: int = 1):
    """batch_size random windows of context_length + 1 ids from `data` -> (x, y), each (batch_size, context_length).

    Start offsets are uniform over every valid position. With world_size > 1 (DDP) every rank draws the same
    batch_size * world_size offsets from an identically seeded generator and keeps its own slice, so the global
    batch is exactly the one a single process would draw (and the ranks never read the same window).
    An unavailable device raises lib.batches.DeviceUnavailableError (a RuntimeError) from the copy itself: nothing is checked
    per batch that the copy does not check anyway."""
    if len(data) <= context_length:
        raise BadInputError(f"data has {len(data)} tokens, fewer than context_length + 1 = {context_length + 1}")
    # Valid starts are 0 .. len - T - 1, so the target of the last input (position s + T) is still in the data.
    starts = torch.randint(len(data) - context_length, (batch_size * world_size,), generator=generator)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].numpy()
    # lib/batches.py reads data[s : s+T+1] for each start s (memmap fancy indexing: just these ids), checks the ids
    # against vocab_size and splits each window into inputs x = ids[:-1] and targets y = ids[1:]: y is x shifted by one.
    return batch_at(data, starts, context_length, torch.device(device), vocab_size)


def eval_starts(n_tokens: int, context_length: int, n_windows: int) -> np.ndarray:
    """The fixed validation windows: all of the split (back to back) when it is small, else n_windows offsets
    drawn from a generator seeded with 0, independent of --seed, so every run's val loss measures the same text."""
    n_all = (n_tokens - 1) // context_length
    if n_all <= n_windows:
        return np.arange(n_all) * context_length
    g = torch.Generator().manual_seed(0)
    return torch.randint(n_tokens - context_length, (n_windows,), generator=g).numpy()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: the handout's save_checkpoint / load_checkpoint
# ---------------------------------------------------------------------------------------------------------------
# What the handout asks for: model, optimizer and iteration in one file, and back. A checkpoint is a dict of tensors
# and plain values (loaded with weights_only=True, so loading a file cannot run code); it also carries the model's
# config, so sample.py rebuilds the model from the file alone, and its tokenizer's fingerprint. The file operations a
# real run needs on top (an atomic write, a size check, one-line errors for a corrupt file, best.pt, the random
# streams for exact resume) are in lib/checkpoints.py; these two functions call through to it.


def save_checkpoint(model, optimizer, iteration: int, out, *, tokenizer_dir: str | None = None, **extra) -> None:
    """Write model + optimizer state, the iteration and `extra` values to `out` (a path or a binary file object).

    A path is written atomically: to out.tmp, flushed to disk, then renamed over `out`, so a crash mid-write leaves
    the previous checkpoint intact; a failure raises cli.WriteFault naming the file and the cause."""
    from lib import checkpoints
    model = checkpoints.unwrap(model)  # the TransformerLM under torch.compile / DDP: plain state-dict keys
    ckpt = checkpoints.checkpoint_dict(model.state_dict(), optimizer.state_dict() if optimizer is not None else None,
                                       iteration, getattr(model, "config", None), tokenizer_dir, **extra)
    checkpoints.write_checkpoint_file(ckpt, out)


def load_checkpoint(src, model, optimizer=None, *, name=None) -> int:
    """Restore model (and optimizer) state from `src` (a path, a file object, or an already-read checkpoint dict
    whose file `name` gives); returns the iteration it was saved at. A missing, corrupt or mismatched file is a
    BadInputError with one line saying so."""
    from lib import checkpoints
    ckpt = src if isinstance(src, dict) else checkpoints.read_checkpoint(src)  # torch.load(weights_only=True)
    checkpoints.load_weights(model, ckpt, name if isinstance(src, dict) else src)
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["iteration"])


# ---------------------------------------------------------------------------------------------------------------
# The model and the optimizer
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(run, ckpt: dict | None, init: dict | None = None):
    """(Trainer, Progress): model, optimizer, batch stream and loss scaler, with the checkpoint's state over them
    when resuming (--init-from: that checkpoint's weights alone, for a new run that starts from them)."""
    from lib.checkpoints import set_rng_state
    from lib.distributed import load_optimizer_state, shard_model, wrap_model
    from lib.runs import Progress, Trainer
    args = run.args
    torch.manual_seed(args["seed"])
    # fast=True: lib/kernels.py's fused attention and hand-derived RMSNorm / SwiGLU backwards (fewer kernels, less
    # memory); --plain: model.py's own lines.
    model = TransformerLM(**dataclasses.asdict(run.cfg), device=run.device, fast=run.fast)
    model.checkpoint_blocks = args["activation_checkpointing"]  # recompute block activations in backward
    if ckpt is not None:
        load_checkpoint(ckpt, model, name=ckpt.get("read_from", f"{run.out}/last.pt"))  # the run's last.pt or best.pt
    elif init is not None:  # only the weights: optimizer, schedule, step and random streams start afresh
        load_checkpoint(init, model, name=args["init_from"])
    if args["fsdp"]:
        shard_model(model, run)
    # over the shards under FSDP, so AdamW's m and v (zeros_like each parameter) are sharded the same way.
    # fused=True: torch's fused kernel for the same update (lib/fused_optim.py); --plain: optim.py's loop.
    optimizer = AdamW(model.parameters(), lr=args["lr"], betas=(args["beta1"], args["beta2"]),
                      weight_decay=args["weight_decay"], fused=run.fast)
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


FP16_INITIAL_SCALE = 2.0**16  # torch's default; the scaler halves it at each overflow and doubles it every 2,000 steps


# ---------------------------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------------------------


def train_step(run, trainer, progress) -> torch.Tensor:
    """One optimizer update: per micro-batch batch, forward, loss, backward; then clip and step. Returns the
    gradient norm before clipping, a 0-dim tensor (no sync)."""
    from lib.distributed import gradient_sync
    accum = run.args["grad_accum"]
    for i in range(accum):
        x, y = get_batch(run.train_data, run.micro_batch, run.cfg.context_length, run.device, trainer.batches,
                         vocab_size=run.cfg.vocab_size, rank=run.rank, world_size=run.world_size)
        with gradient_sync(run, trainer, last=i == accum - 1):  # torchrun: reduce only after the last micro-batch
            with run.autocast:
                # fast=True: lib/fused_optim.py's chunked fused softmax (no full-size log-probabilities kept)
                loss = cross_entropy(trainer.train(x), y, fast=run.fast)
            # / accum: the sum of micro-gradients is the mean over the batch; scale(): x the fp16 loss scale
            trainer.scaler.scale(loss / accum).backward()
        progress.add_loss(loss.detach() / accum)
    trainer.scaler.unscale_(trainer.optimizer)  # true gradients before clipping, so --grad-clip sees real norms
    max_norm = run.args["grad_clip"] or math.inf
    if run.fast:  # the clipping division folded into the fused AdamW kernel: one pass over the gradients fewer
        grad_norm, divisor = clip_divisor(trainer.model.parameters(), max_norm)
    else:  # optim.py's clip_grad_norm: scale the gradients in place
        grad_norm, divisor = clip_grad_norm(trainer.model.parameters(), max_norm), None
    if trainer.scaler.is_enabled():
        progress.skipped_steps += ~torch.isfinite(grad_norm)  # exactly the steps the scaler will skip (no sync)
    trainer.scaler.step(trainer.optimizer, grad_divisor=divisor)  # the step, unless a gradient was inf/nan
    trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


def train(args: dict, ckpt: dict | None = None) -> Path:
    """Run (or resume) training as `args` say; returns the run directory. `args` itself is left unchanged."""
    from lib import runs  # the run's set-up, log, checkpoint files and signals (lib/runs.py)
    from lib.distributed import end_process_group, wait_for_all_ranks
    run, init = runs.setup_run(args, ckpt)
    trainer, progress = build_trainer(run, ckpt, init)
    resumed = ckpt is not None
    del ckpt, init  # the loaded copies of weights and optimizer state: the model and optimizer hold their own now
    log = runs.open_run_dir(run, progress, trainer.model, resumed=resumed)  # config.json, log.jsonl: a RunLog
    progress.checkpoint_size = runs.expected_checkpoint_bytes(trainer)
    progress.begin(run.device)
    stop = runs.Stop(run.out)
    try:
        if progress.step == 0:  # step 0: the loss of the untrained model (about ln V) anchors every curve
            val = validation_loss(run, trainer)
            log.write({"step": 0, "lr": run.lr_at(0), "tokens": 0, "time": round(progress.elapsed, 3),
                       "val_loss": val, "val_ppl": runs.perplexity(val)})
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
                row = runs.log_row(run, progress, lr, grad_norm)
                if is_eval:
                    val = validation_loss(run, trainer)
                    row.update(val_loss=val, val_ppl=runs.perplexity(val))
                    best = val < progress.best_val_loss
                    progress.best_val_loss = min(val, progress.best_val_loss)
                log.write(row, " | best" if best else "")
            last = step % run.args["ckpt_interval"] == 0 or step == run.args["max_iters"] or stopping
            if last:
                runs.check_finite(run, progress, lr)  # never checkpoint a NaN: last.pt stays the last good state
            runs.save_checkpoints(run, trainer, progress, last=last, best=best)
            if is_log:
                progress.last_log_time = time.time()  # ms/step and tokens/s exclude evaluation and checkpoint time
            if stopping:
                if run.master:
                    print(f"{stop.requested}: saved {run.out}/last.pt at step {step}; continue with "
                          f"`python train.py --resume {run.out}`")
                break
        wait_for_all_ranks()  # torchrun: only after a normal end (see lib/distributed.py)
    except BaseException:
        log.abandon()  # a run that fails before its first step leaves no files behind
        raise
    finally:
        stop.restore()
        log.close()
        end_process_group()
    return run.out


def train_main(argv) -> Path:
    from lib.runs import resolve_args
    return train(*resolve_args(argv))  # (no reference to the resumed checkpoint stays here while training runs)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: the mean loss over fixed validation windows
# ---------------------------------------------------------------------------------------------------------------


def evaluate(model, data, starts, micro_batch, context_length, device, autocast, vocab_size=None, rank=0,
             world_size=1, fast: bool = False) -> float:
    """Mean loss per token over the fixed validation windows `starts` (the model is put back in training mode).
    The windows are scored by lib/evaluation.loss_over_windows, the evaluator sample.py --eval uses too."""
    from lib.evaluation import loss_over_windows
    model.eval()
    loss_sum, count = loss_over_windows(model, data, starts, context_length, micro_batch, device, autocast,
                                        vocab_size, rank=rank, world_size=world_size, fast=fast)
    model.train()
    return loss_sum / count


def validation_loss(run, trainer) -> float:
    """Mean loss over the run's fixed validation windows; ranks share the windows."""
    return evaluate(trainer.forward, run.val_data, run.val_starts, run.micro_batch, run.cfg.context_length,
                    run.device, run.autocast, run.cfg.vocab_size, run.rank, run.world_size, fast=run.fast)


# ---------------------------------------------------------------------------------------------------------------
# Command line: train (the default), demo, plot, export, import
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("plot", "demo", "export", "import") else "train"
    from lib.runs import StopNow  # (run management and the other commands load only when a command runs)
    try:
        if command == "plot":
            from lib import demo
            demo.plot_main(argv[1:])
        elif command in ("export", "import"):
            from lib import hf_export
            (hf_export.export_main if command == "export" else hf_export.import_main)(argv[1:])
        elif command == "demo" or not argv:
            from lib import demo
            demo.demo_main(argv[1:])
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


if __name__ == "__main__":
    from lib.cpu_tuning import tune_process
    tune_process()  # first: the threads torch starts later inherit the subnormal setting
    exit_code = main()
    if "WORLD_SIZE" in os.environ:  # a rank that torchrun started (see exit_skipping_teardown)
        from lib.distributed import exit_skipping_teardown
        exit_skipping_teardown(exit_code)
    sys.exit(exit_code)
