"""experiments/run.py: the experiments of CS336 assignment 1 (§7, plus §2.7's tokenizer experiments and §3.6's
accounting), one command per study, at two sizes.

Every training run is one `train.py` command line, printed before it runs (as a subprocess), so each run in
EXPERIMENTS.md is a command a reader can repeat by hand; the final model is then scored on the whole validation
split here, with train.py's own `evaluate` (`sample.py RUN/last.pt --eval valid.npy` runs the same evaluator,
lib/evaluation.loss_over_windows, and gives the same number). `--quick` fits a 2-core
CPU (kernel-docs from ../shared/data, a 10K BPE tokenizer, a model with 0.8M non-embedding parameters, 1-2 minutes
per run); `--full` is the handout's scale on one GPU (TinyStories,
the 17M model, 327,680,000 tokens per run) and is meant to be printed with `--dry-run` unless a GPU is at hand.

    python experiments/run.py prep --quick               # 10K BPE on kernel-docs-train, encode train/valid (cached)
    python experiments/run.py lr --quick                  # one study: its runs, a Markdown table, a loss-curve plot
    python experiments/run.py all --full --dry-run        # every command of the handout-scale studies, not run

Studies: prep, tokenizer, lr, batch, ablations, noise, generate, accounting (and `all`, in that order). Runs live in
runs/experiments/<scale>/<run> (gitignored) and are reused when their command line has not changed (--force reruns);
tables go to experiments/results/<study>-<scale>.md and plots to experiments/plots/<study>-<scale>.png.
"""
import argparse
import dataclasses
import functools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so `import bpe, accounting` works when run as `python experiments/run.py`
from bpe import END_OF_TEXT as EOT  # noqa: E402 (needs the path above)
from lib.cli import OneLineParser, atomic_file, atomic_write_text  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Scales: what --quick and --full train on
# ---------------------------------------------------------------------------------------------------------------
# One baseline per scale; every study changes one thing against it and keeps the token budget and the seed.
# quick: sized so one run takes ~1-2 minutes on 2 idle CPU cores (~300 ms/step, measured: see EXPERIMENTS.md).
#   d_ff = 8/3 d_model rounded up to a multiple of 8 (the handout's SwiGLU rule); head dim 32. Peak lr 3e-3 was
#   fixed before the lr sweep (which puts this model's best at 1e-2..3e-2 for this budget).
# full: the handout's TinyStories model and budget: 128 x 256 tokens x 10,000 steps = 327,680,000 tokens.
# Validation: train.py evaluates a fixed set of `eval_windows` windows every eval_interval steps (the curves; the
# same windows for every batch size, since eval_iters x batch_size is held at eval_windows), and the final model
# is then scored on the WHOLE validation split (the tables).

# cpu: the scale for real results on 2 CPU cores. Every run sees >= 3M tokens (32 x 128 x 733 steps), which a
#   10K vocabulary cannot afford: its embedding and lm_head (2 x 10K x 128) would be 2.6M of the model's 3.4M
#   parameters and most of its FLOPs. A 2,048-token BPE on the same kernel-docs keeps them at 0.5M of 1.3M, so the
#   budget goes into the blocks; the text costs 2.55 bytes/token instead of 3.42 (so 3M tokens = 7.7 MB of text,
#   a third of the training split, no repeats). The studies sweep each arm's lr (`sweep`: multiples of the lr
#   study's best) and repeat its best lr with `arm_seeds`; quick and full keep one lr and one seed per arm.
SCALES = {
    "quick": dict(
        model=dict(context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=344),
        batch_size=16, max_iters=200, lr=3e-3, warmup_frac=0.1, evals=4, eval_windows=256,
        device="cpu", extra=[],
        lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0], batch_sizes=[8, 16, 32, 64], seeds=[0, 1, 2],
        sweep=[1.0], arm_seeds=[0], data="kernel-docs", vocab_size=10_000, prompt="The kernel",
    ),
    "cpu": dict(
        model=dict(context_length=128, d_model=128, num_layers=4, num_heads=4, d_ff=344),
        batch_size=32, max_iters=733, lr=1e-2, warmup_frac=0.05, evals=8, eval_windows=256,
        device="cpu", extra=[],
        lrs=[1e-3, 3e-3, 1e-2, 2e-2, 4e-2, 8e-2, 0.16, 0.32], batch_sizes=[16, 32, 64, 128], seeds=[0, 1, 2],
        sweep=[0.5, 1.0, 2.0], arm_seeds=[0, 1], data="kernel-docs-2k", vocab_size=2048, prompt="The kernel",
    ),
    "full": dict(
        model=dict(context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
        batch_size=128, max_iters=10_000, lr=1e-3, warmup_frac=0.05, evals=20, eval_windows=4096,
        device="cuda", extra=["--compile"],
        lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], batch_sizes=[32, 64, 128, 256, 512], seeds=[0, 1, 2],
        sweep=[1.0], arm_seeds=[0], data="tinystories", vocab_size=10_000, prompt="Once upon a time",
    ),
}


def shared_dir(arg: str | None) -> Path:
    """--shared, else $CS336_SHARED, else ../shared beside the repository (where the course data lives)."""
    return Path(arg or os.environ.get("CS336_SHARED") or REPO.parent / "shared")


def data_dir(scale: str, runs: Path) -> Path:
    """The `bpe.py prepare`-style directory (vocab.json, merges.txt, train.npy, valid.npy) a scale trains on."""
    return runs / "data" / SCALES[scale]["data"]


# ---------------------------------------------------------------------------------------------------------------
# Running commands: print, run, keep the output
# ---------------------------------------------------------------------------------------------------------------


class Runner:
    """Runs command lines from the repository root, printing each first (`$ ...`); with dry_run only prints."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def __call__(self, cmd: list[str], check: bool = True) -> tuple[int, str]:
        """(exit code, stdout + stderr). Output streams through as it comes, so long runs show progress."""
        print("$ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return 0, ""
        # "python" means this interpreter (the printed command stays copy-pasteable)
        argv = [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            print("  " + line, end="", flush=True)
            lines.append(line)
        rc = proc.wait()
        if check and rc != 0:
            sys.exit(f"run.py: `{shlex.join(cmd)}` failed with exit code {rc}")
        return rc, "".join(lines)


def rel(path: Path) -> str:
    """A path as the commands print it: relative to the repo root when inside it (shorter, copy-pasteable)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Data preparation: tokenizers and token ids, cached under runs/experiments/data
# ---------------------------------------------------------------------------------------------------------------
# quick: a 10K BPE on all of kernel-docs-train.txt (27 MB, documents separated by <|endoftext|>), both splits
# encoded; and, for the tokenizer study's contrast, a 10K BPE on the first 90% of tinyshakespeare (by lines), the
# last 10% held out. full: `bpe.py prepare tinystories` and `bpe.py prepare owt` (downloads).


def split_lines(src: Path, train: Path, valid: Path, frac: float = 0.9) -> None:
    """The first `frac` of src's lines -> train, the rest -> valid (a held-out tail for a corpus with no split)."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * frac)
    atomic_write_text(train, "".join(lines[:cut]))
    atomic_write_text(valid, "".join(lines[cut:]))


def prep_kernel_docs(out: Path, vocab_size: int, corpus: Path, run: Runner) -> None:
    """A BPE of vocab_size on all of kernel-docs-train (with <|endoftext|>), and both splits encoded, into out."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "valid.npy").is_file() or run.dry_run:
        run(["python", "bpe.py", "train", "--input", str(corpus / "kernel-docs-train.txt"), "--vocab-size",
             str(vocab_size), "--special-tokens", EOT, "--out", rel(out)])
        for split in ("train", "valid"):
            run(["python", "bpe.py", "encode", "--tokenizer", rel(out), "--input",
                 str(corpus / f"kernel-docs-{split}.txt"), "--output", rel(out / f"{split}.npy")])


@functools.cache  # read by every run's outcome: the token counts are the same for all of them
def unigram_loss(scale: str, runs: Path) -> float:
    """The whole-split validation loss (nats/token) of a model that knows only token frequencies: the training
    split's unigram distribution (add-one smoothed, so no token has probability 0), scored on the validation split.
    A trained model must end far below it to have learned anything about context."""
    import numpy as np
    import train
    d = data_dir(scale, runs)
    train_ids, valid_ids = train.load_tokens(d / "train.npy"), train.load_tokens(d / "valid.npy")
    vocab = int(max(train_ids.max(), valid_ids.max())) + 1
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[valid_ids[1:]].mean())  # the first token is never a target


def prep(scale: str, runs: Path, shared: Path, run: Runner) -> None:
    if scale == "full":
        (runs / "data").mkdir(parents=True, exist_ok=True)
        for name in ("tinystories", "owt"):
            if not (runs / "data" / name / "valid.npy").is_file() or run.dry_run:
                run(["python", "bpe.py", "prepare", name, "--out", rel(runs / "data" / name)])
        return
    corpus = shared / "data"
    if not (corpus / "kernel-docs-train.txt").is_file():
        sys.exit(f"run.py: {corpus}/kernel-docs-train.txt not found: pass --shared DIR (the directory holding "
                 f"data/kernel-docs-*.txt) or set CS336_SHARED")
    for scale_ in (["quick", "cpu"] if scale == "cpu" else [scale]):
        prep_kernel_docs(data_dir(scale_, runs), SCALES[scale_]["vocab_size"], corpus, run)
    ts = runs / "data" / "tinyshakespeare"
    if not (ts / "vocab.json").is_file() or run.dry_run:
        ts.mkdir(parents=True, exist_ok=True)
        print(f"# split {corpus}/tinyshakespeare.txt by lines: first 90% -> {rel(ts)}/train.txt, rest -> valid.txt")
        if not run.dry_run:
            split_lines(corpus / "tinyshakespeare.txt", ts / "train.txt", ts / "valid.txt")
        run(["python", "bpe.py", "train", "--input", rel(ts / "train.txt"), "--vocab-size", "10000",
             "--special-tokens", EOT, "--out", rel(ts)])


# ---------------------------------------------------------------------------------------------------------------
# Training runs: one train.py command each, then the final model scored on the whole validation split
# ---------------------------------------------------------------------------------------------------------------


def train_command(scale: str, runs: Path, name: str, **changes) -> tuple[Path, list[str]]:
    """(run directory, the train.py command line) for the scale's baseline with `changes` applied.

    changes: lr, batch_size, max_iters, seed, or any model field (norm="none", position="nope", ffn="silu", ...).
    The token budget stays batch_size x context_length x max_iters; a batch-size study passes max_iters too."""
    from model import ModelConfig
    s = SCALES[scale]
    model_changes = {k: v for k, v in changes.items() if k not in ("lr", "batch_size", "max_iters", "seed")}
    # The study's change on top of the scale's baseline, through with_overrides: it validates the ablation and owns
    # the handout's SiLU rule (ffn="silu" -> d_ff = 4 d_model); the command spells out only the fields set here.
    cfg = ModelConfig().with_overrides(**s["model"]).with_overrides(**model_changes)
    model = {k: getattr(cfg, k) for k in {**s["model"], **model_changes}}
    lr, batch = changes.get("lr", s["lr"]), changes.get("batch_size", s["batch_size"])
    steps, seed = changes.get("max_iters", s["max_iters"]), changes.get("seed", 0)
    out = runs / scale / name
    cmd = ["python", "train.py", "--data", rel(data_dir(scale, runs)), "--out", rel(out), "--overwrite",
           "--device", s["device"], "--seed", str(seed)]
    for key, value in model.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    cmd += ["--batch-size", str(batch), "--max-iters", str(steps),
            "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}",  # the cosine ends at lr/10 whatever lr is
            "--warmup-iters", str(max(1, int(steps * s["warmup_frac"]))),
            "--eval-interval", str(max(1, steps // s["evals"])),
            "--eval-iters", str(max(1, s["eval_windows"] // batch)),  # the same eval_windows windows for every batch
            "--log-interval", str(max(1, steps // 40)),
            "--ckpt-interval", str(steps), *s["extra"]]
    return out, cmd


def summarize_log(run_dir: Path) -> dict:
    """What the tables need from a run's log.jsonl: last train loss, first and last val loss on the fixed windows,
    median ms/step (the first log interval, which includes warm-up, left out), wall time, MFU."""
    from lib.runs import read_log
    rows = read_log(run_dir / "log.jsonl")
    steps = [r for r in rows if "loss" in r]  # training-step rows (step 0 has only val fields)
    val = [r for r in rows if "val_loss" in r]
    peak = max(steps, key=lambda r: r["loss"]) if steps else {"loss": None, "step": None}
    ms = [r["ms_per_step"] for r in steps[1:]] or [r["ms_per_step"] for r in steps]
    mfu = [r["mfu"] for r in steps[1:] if "mfu" in r]
    return {"steps": rows[-1]["step"], "tokens": rows[-1]["tokens"], "time_s": rows[-1]["time"],
            "train_loss": steps[-1]["loss"] if steps else None, "val_loss_0": val[0]["val_loss"] if val else None,
            "val_loss_subset": val[-1]["val_loss"] if val else None, "max_train_loss": peak["loss"],
            "max_train_loss_step": peak["step"], "val_rise": largest_rise(val),
            "ms_per_step": statistics.median(ms) if ms else None, "mfu": statistics.median(mfu) if mfu else None}


def largest_rise(val: list[dict]) -> dict | None:
    """The largest climb of the validation curve above its lowest point so far: {"nats", "from_step", "from_loss",
    "to_step", "to_loss"}, or None if the curve never rises. The curve is measured on the same fixed windows at
    every eval, so it has no sampling noise between evals: a healthy run's curve only falls."""
    best, rise = None, None
    for r in val:
        if best is None or r["val_loss"] < best["val_loss"]:
            best = r
        elif rise is None or r["val_loss"] - best["val_loss"] > rise["nats"]:
            rise = {"nats": r["val_loss"] - best["val_loss"], "from_step": best["step"],
                    "from_loss": best["val_loss"], "to_step": r["step"], "to_loss": r["val_loss"]}
    return rise


def whole_split_loss(ckpt: Path, valid: Path, device: str) -> float:
    """Mean loss of a checkpoint over EVERY window of the validation split, back to back: train.py's own evaluate()
    over the windows its eval_starts() picks when asked for more windows than the split holds (so the same average
    as the training log's val loss, on all of the text instead of a fixed subset). fp32, batches of 64 windows."""
    import contextlib
    import torch
    import sample
    import train
    model, _, _ = sample.load_model(ckpt, device, fast=True)
    T = model.config.context_length
    data = train.load_tokens(valid)
    starts = train.eval_starts(len(data), T, len(data))  # n_windows >= all windows: the whole split
    return train.evaluate(model, data, starts, 64, T, torch.device(device), contextlib.nullcontext(),
                          model.config.vocab_size, fast=True)


SPIKE_NATS = 1.0  # a training loss this far above the untrained model's is a blow-up, not noise
RISE_NATS = 0.1  # a validation curve (fixed windows) climbing this far above its best lost what it had learned
STALL_NATS = 0.05  # a final loss this close to the unigram line's has learned nothing beyond token frequencies


def outcome(record: dict, unigram: float | None = None) -> str:
    """diverged (train.py stopped on nan/inf, or the final loss is above the untrained model's), unstable (the
    training loss blew up above the untrained model's at some point, or the validation curve climbed back up by more
    than RISE_NATS, then came back down), stalled (it ends no better than the unigram line, `unigram`), or ok.
    With Adam and gradient clipping a too-large lr rarely reaches nan/inf: the update's size is bounded by the lr,
    so the typical failure is the climb (the model is pushed back towards what token frequencies alone give) and a
    partial recovery once the cosine schedule lowers the lr, or no progress past the unigram line at all."""
    if record.get("nan_step") is not None:
        return f"diverged: nan/inf by step {record['nan_step']}"
    if not record["val_loss_full"] < record["val_loss_0"]:
        return "diverged: final val loss above step 0's"
    if record["max_train_loss"] > record["val_loss_0"] + SPIKE_NATS:
        return (f"unstable: train loss {record['max_train_loss']:.1f} at step {record['max_train_loss_step']} "
                f"(step 0: {record['val_loss_0']:.1f}), then recovered")
    rise = record.get("val_rise")
    if rise and rise["nats"] > RISE_NATS:
        after = "then fell again" if record["val_loss_subset"] < rise["to_loss"] else "and ended there"
        return (f"unstable: val loss rose from {rise['from_loss']:.2f} (step {rise['from_step']}) to "
                f"{rise['to_loss']:.2f} (step {rise['to_step']}), {after}")
    if unigram is not None and record["val_loss_full"] > unigram - STALL_NATS:
        return f"stalled: no better than token frequencies ({unigram:.2f})"
    return "ok"


def train_run(scale: str, runs: Path, run: Runner, name: str, force: bool = False, **changes) -> dict:
    """Train (unless an identical finished run exists), score the final model on the whole validation split, and
    return the run's record (also saved as RUN/result.json). A run that train.py stops on a nan/inf loss (exit 1) is
    recorded as diverged; so is one that ends with a higher validation loss than it started with."""
    out, cmd = train_command(scale, runs, name, **changes)
    record_path = out / "result.json"
    if not force and not run.dry_run and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["cmd"] == shlex.join(cmd[1:]):
            print(f"# reusing {rel(out)} (same command; --force reruns it)")
            record.update(summarize_log(out))
            record["outcome"] = outcome(record, unigram_loss(scale, runs))
            return record
    rc, text = run(cmd, check=False)
    if run.dry_run:
        print(f"# then: whole-split validation loss of {rel(out / 'last.pt')} (train.evaluate over every window)")
        return {"name": name, "changes": changes}
    nan = re.search(r"loss became nan/inf by step (\d+)", text)
    if rc not in (0, 1) or (rc == 1 and not nan):
        sys.exit(f"run.py: train.py failed (exit code {rc}); see its output above")
    record = {"name": name, "changes": dict(changes), "cmd": shlex.join(cmd[1:]), **summarize_log(out)}
    if nan:
        record.update(nan_step=int(nan.group(1)), val_loss_full=None)
    else:
        record["val_loss_full"] = whole_split_loss(out / "last.pt", data_dir(scale, runs) / "valid.npy",
                                                   SCALES[scale]["device"])
        print(f"# whole-split validation loss of {rel(out / 'last.pt')}: {record['val_loss_full']:.4f}")
    record["outcome"] = outcome(record, unigram_loss(scale, runs))
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")  # a killed study never leaves half of it
    return record


def describe(changes: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changes.items()) or "baseline"


def fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def runs_table(records: list[dict]) -> str:
    """The Markdown table of a training study; the full-validation loss is the headline column."""
    lines = ["| run | vs baseline | steps | tokens | outcome | final train loss | val loss (fixed windows) "
             "| **val loss (whole valid split)** | wall s | ms/step |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['name']} | {describe(r['changes'])} | {r['steps']} | {r['tokens']:,} | {r['outcome']} | "
                     f"{fmt(r['train_loss'])} | {fmt(r['val_loss_subset'])} | **{fmt(r['val_loss_full'])}** | "
                     f"{r['time_s']:.0f} | {fmt(r['ms_per_step'], '.0f')} |")
    return "\n".join(lines)


def finish_study(study: str, scale: str, runs: Path, run: Runner, records: list[dict], note: str = "",
                 plotted: list[dict] | None = None) -> None:
    """Print (and save under experiments/results/) the study's table with the unigram line beside it, and plot the
    curves of its runs (or of `plotted`) with train.py."""
    plot = REPO / "experiments" / "plots" / f"{study}-{scale}.png"
    if not run.dry_run:
        plot.parent.mkdir(parents=True, exist_ok=True)
    run(["python", "train.py", "plot", *[rel(runs / scale / r["name"]) for r in plotted or records], "-o", rel(plot)])
    if run.dry_run:
        return
    unigram = (f"Knows only token frequencies (the training split's unigram distribution, add-one smoothed, scored "
               f"on the whole validation split): **{unigram_loss(scale, runs):.3f}** nats/token.")
    text = (f"<!-- written by `python experiments/run.py {study} --{scale}` -->\n"
            f"{machine_line(scale)}\n\n{runs_table(records)}\n\n{unigram}\n" + (f"\n{note}\n" if note else ""))
    save_result(study, scale, text)


def machine_line(scale: str) -> str:
    """A results file's machine line: lib.measure.machine_line() (CPU, cores, torch, threads, Python), the scale's
    training device, and when the results were written."""
    from lib import measure
    return (f"Machine: {measure.machine_line()}; device {SCALES[scale]['device']}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")


def save_result(study: str, scale: str, text: str) -> None:
    path = REPO / "experiments" / "results" / f"{study}-{scale}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    print(f"\n{text}\n# saved {rel(path)}")


# ---------------------------------------------------------------------------------------------------------------
# The training studies: learning rate, batch size, ablations, seed noise
# ---------------------------------------------------------------------------------------------------------------


def arm_run(scale, runs, run, force=False, arm="", lr=None, seed=0, **changes) -> dict:
    """One run of an arm (a name for `changes`; "" = the baseline's configuration) at lr and seed. The name says
    what differs from the scale's baseline: "base-s0", "lr0.02", "base-s1", "nope", "nope-lr0.02-s1", "bs64-lr0.01"."""
    default_lr = SCALES[scale]["lr"]
    lr = default_lr if lr is None else lr
    if not arm:
        name = f"base-s{seed}" if lr == default_lr else f"lr{lr:g}" + (f"-s{seed}" if seed else "")
    else:
        name = arm + (f"-lr{lr:g}" if lr != default_lr else "") + (f"-s{seed}" if seed else "")
    if lr != default_lr:
        changes["lr"] = lr
    if seed:
        changes["seed"] = seed
    return train_run(scale, runs, run, name, force, **changes)


def whole_split_losses(records: list[dict]) -> list[float]:
    """The runs' whole-split validation losses, diverged runs (which have none) left out."""
    return [r["val_loss_full"] for r in records if r.get("val_loss_full") is not None]


def lowest(records: list[dict]) -> dict:
    """The record with the lowest whole-split validation loss (diverged runs have none and never win); the middle
    one when none has a loss (a --dry-run, or every run diverged)."""
    scored = [r for r in records if r.get("val_loss_full") is not None]
    return min(scored, key=lambda r: r["val_loss_full"]) if scored else records[len(records) // 2]


def run_lr(record: dict, scale: str) -> float:
    return record.get("changes", {}).get("lr", SCALES[scale]["lr"])


def round_lr(lr: float) -> float:
    return float(f"{lr:.2g}")  # two significant digits: names and commands stay short (0.0071, not 0.00707107)


MAX_SWEEP_EXTENSIONS = 2


def sweep_to_minimum(scale: str, train_at, lrs: list[float]) -> list[dict]:
    """train_at(lr) -> record for each lr; then, while the lowest whole-split loss is at the smallest or the largest
    lr swept, one lr further out on that side (by the same ratio as that end to its neighbour), at most
    MAX_SWEEP_EXTENSIONS times: a best lr at the end of a sweep is only a bound on the best. Sorted by lr."""
    records = [train_at(lr) for lr in lrs]
    for _ in range(MAX_SWEEP_EXTENSIONS if len(lrs) > 1 else 0):
        by_lr = sorted(records, key=lambda r: run_lr(r, scale))
        best = lowest(records)
        if best.get("val_loss_full") is None or best not in (by_lr[0], by_lr[-1]):
            break  # bracketed (or nothing scored, as in a --dry-run)
        edge, inner = (by_lr[0], by_lr[1]) if best is by_lr[0] else (by_lr[-1], by_lr[-2])
        records.append(train_at(round_lr(run_lr(edge, scale) ** 2 / run_lr(inner, scale))))
    return sorted(records, key=lambda r: run_lr(r, scale))


def lr_sweep(scale, runs, run, force=False) -> list[dict]:
    s = SCALES[scale]
    return [arm_run(scale, runs, run, force, lr=lr) for lr in s["lrs"]]


def center_lr(scale, runs, run, force=False) -> float:
    """The lr the other studies sweep around: the lr study's best at a scale that sweeps, else the baseline's."""
    if len(SCALES[scale]["sweep"]) == 1 or run.dry_run:
        return SCALES[scale]["lr"]
    return run_lr(lowest(lr_sweep(scale, runs, run, force)), scale)


def best_of_arm(scale, runs, run, force, arm, lrs, seeds, **changes) -> tuple[list[dict], list[dict]]:
    """(every run of the arm, the runs at its best lr over `seeds`): the lrs with seed 0, then the best one again
    with the other seeds."""
    swept = sweep_to_minimum(scale, lambda lr: arm_run(scale, runs, run, force, arm, lr, 0, **changes), lrs)
    best = run_lr(lowest(swept), scale)
    repeats = [arm_run(scale, runs, run, force, arm, best, seed, **changes) for seed in seeds if seed]
    return swept + repeats, [r for r in swept if run_lr(r, scale) == best] + repeats


def study_lr(scale, runs, run, force=False) -> None:
    """§7.2 learning-rate sweep: same budget and seed, peak lr varied (min lr = lr/10), including a divergent one.
    The edge of stability: the largest lr that trained ok and the smallest that did not."""
    records = lr_sweep(scale, runs, run, force)
    ok = [run_lr(r, scale) for r in records if r.get("outcome") == "ok"]
    bad = [run_lr(r, scale) for r in records if r.get("outcome", "ok") != "ok"]
    note = (f"Best lr {run_lr(lowest(records), scale):g}; largest lr that trained ok {max(ok):g}; smallest that "
            f"diverged or blew up {min(bad):g}." if ok and bad else "")
    finish_study("lr", scale, runs, run, records, note)


def study_batch(scale, runs, run, force=False) -> None:
    """§7.2 batch-size sweep at a fixed token budget: steps = budget / (batch x context), rounded up. At a scale that
    sweeps, each batch size gets its own lrs (sweep multiples of the lr study's best, scaled by sqrt(batch / baseline
    batch), the square-root rule of Adam-type optimisers) and the best of each is compared; else the baseline's lr."""
    s = SCALES[scale]
    budget, center = s["batch_size"] * s["max_iters"], center_lr(scale, runs, run, force)  # budget in sequences
    records, best = [], []
    for b in s["batch_sizes"]:
        steps = -(-budget // b)  # rounded up: never fewer tokens than the baseline
        arm, changes = ("", {}) if b == s["batch_size"] else (f"bs{b}", dict(batch_size=b, max_iters=steps))
        lrs = [round_lr(center * (b / s["batch_size"]) ** 0.5 * f) if len(s["sweep"]) > 1 else s["lr"]
               for f in s["sweep"]]
        swept, _ = best_of_arm(scale, runs, run, force, arm, lrs, [0], **changes)  # seed 0 only: no repeats
        records += swept
        best.append((b, lowest(swept)))
    note = ""
    if len(s["sweep"]) > 1 and not run.dry_run:
        note = ("Best per batch size:\n\n| batch | steps | best lr | **val loss (whole split)** |\n"
                "|---:|---:|---:|---:|\n")
        note += "\n".join(f"| {b} | {r['steps']} | {run_lr(r, scale):g} | **{fmt(r['val_loss_full'])}** |"
                          for b, r in best)
    finish_study("batch", scale, runs, run, records, note, plotted=[r for _, r in best])


def ablation_arms(scale: str, center: float) -> list[tuple[str, list[float], dict]]:
    """(arm, its lrs, its changes): the baseline, no RMSNorm (at the baseline's lr and lower ones: it is expected to
    need a smaller lr), post-norm, NoPE, and a SiLU FFN with d_ff = 4 d_model (matched parameters)."""
    s = SCALES[scale]
    if len(s["sweep"]) == 1:  # quick / full: one lr per arm, and no RMSNorm also at lr/10
        lr = s["lr"]
        return [("", [lr], {}), ("nonorm", [lr], dict(norm="none")), ("nonorm", [lr / 10], dict(norm="none")),
                ("postnorm", [lr], dict(norm="post")), ("nope", [lr], dict(position="nope")),
                ("silu", [lr], dict(ffn="silu"))]
    around = [round_lr(center * f) for f in s["sweep"]]
    return [("", around, {}), ("nonorm", [center, round_lr(center / 3), round_lr(center / 10)], dict(norm="none")),
            ("postnorm", around, dict(norm="post")), ("nope", around, dict(position="nope")),
            ("silu", around, dict(ffn="silu"))]


def study_ablations(scale, runs, run, force=False) -> None:
    """§7.3 ablations at the baseline's budget, each arm at its best lr of a small sweep, repeated over seeds (the
    baseline over all the noise study's seeds: its spread is the noise band the other arms are read against)."""
    s = SCALES[scale]
    center = center_lr(scale, runs, run, force)
    records, best = [], []
    for arm, lrs, changes in ablation_arms(scale, center):
        seeds = (s["seeds"] if not arm else s["arm_seeds"]) if len(s["sweep"]) > 1 else [0]
        every, at_best = best_of_arm(scale, runs, run, force, arm, lrs, seeds, **changes)
        records += [r for r in every if r not in records]
        best.append((arm or "baseline", at_best))
    note = ""
    if len(s["sweep"]) > 1 and not run.dry_run:
        note = ablation_summary(best, scale)
        plot_ablations(best, scale, REPO / "experiments" / "plots" / f"ablations-{scale}-summary.png")
    finish_study("ablations", scale, runs, run, records, note, plotted=[rs[0] for _, rs in best])


def ablation_summary(best: list[tuple[str, list[dict]]], scale: str) -> str:
    """Markdown: each arm's best lr, its whole-split losses over seeds, their mean, and the mean's difference from
    the baseline's against the baseline's seed range (the noise band)."""
    base = whole_split_losses(best[0][1])
    lines = [f"Each arm at its best lr, over seeds; the baseline's {len(base)} seeds span "
             f"{max(base) - min(base):.3f} nats (the noise band on the plot).", "",
             "| arm | best lr | val loss per seed (whole split) | mean | mean - baseline mean |",
             "|---|---:|---|---:|---:|"]
    for arm, rs in best:
        losses = whole_split_losses(rs)
        mean = statistics.mean(losses) if losses else None
        diff = None if mean is None else mean - statistics.mean(base)
        lines.append(f"| {arm} | {run_lr(rs[0], scale):g} | {', '.join(f'{x:.3f}' for x in losses) or '—'} | "
                     f"{fmt(mean)} | {fmt(diff, '+.3f')} |")
    return "\n".join(lines)


def plot_ablations(best: list[tuple[str, list[dict]]], scale: str, path: Path) -> None:
    """Each arm's final whole-split loss per seed (dots) and mean (bar), over the baseline's seed range (band)."""
    from lib.cli import optional_import
    plt = optional_import("matplotlib.pyplot", "matplotlib", "the ablation summary plot")
    base = whole_split_losses(best[0][1])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axhspan(min(base), max(base), color="0.85", label=f"baseline seed range ({len(base)} seeds)")
    for x, (arm, rs) in enumerate(best):
        losses = whole_split_losses(rs)
        ax.scatter([x] * len(losses), losses, color="C0", zorder=3)
        if losses:
            ax.hlines(statistics.mean(losses), x - 0.3, x + 0.3, color="C1", zorder=2)
    ax.set_xticks(range(len(best)), [f"{arm}\nlr {run_lr(rs[0], scale):g}" for arm, rs in best])
    ax.set_ylabel("final val loss, whole split (nats/token)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=120, format="png")
    print(f"# saved {rel(path)}")


def study_noise(scale, runs, run, force=False) -> None:
    """Run-to-run noise: the baseline with different seeds (init and batch order); on CPU a repeat of the same seed
    is bit-identical, so the seed is what varies."""
    records = [arm_run(scale, runs, run, force, seed=seed) for seed in SCALES[scale]["seeds"]]
    full = [r.get("val_loss_full") for r in records]
    note = (f"Whole-split val loss over {len(full)} seeds: mean {statistics.mean(full):.4f}, "
            f"sample std {statistics.stdev(full):.4f}, range {max(full) - min(full):.4f}.") if None not in full else ""
    finish_study("noise", scale, runs, run, records, note)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer study (§2.7): compression, throughput, longest tokens
# ---------------------------------------------------------------------------------------------------------------


def study_tokenizer(scale, runs, run, shared: Path, force=False) -> None:
    """bytes/token of each tokenizer on each corpus's held-out text, single-process encode throughput (a fresh
    tokenizer, so caches start cold, then the same text again warm), and each tokenizer's longest tokens."""
    import bpe
    if scale == "full":
        corpora = {"tinystories": runs / "data" / "tinystories" / "TinyStoriesV2-GPT4-valid.txt",
                   "owt": runs / "data" / "owt" / "owt_valid.txt"}
        tokenizers = {name: runs / "data" / name for name in corpora}
    else:
        corpora = {"kernel-docs": shared / "data" / "kernel-docs-valid.txt",
                   "tinyshakespeare": runs / "data" / "tinyshakespeare" / "valid.txt"}
        tokenizers = {"kernel-docs": runs / "data" / "kernel-docs", "tinyshakespeare": runs / "data" /
                      "tinyshakespeare"}
        if SCALES[scale]["data"] != "kernel-docs":  # --cpu trains on a smaller kernel-docs vocabulary: show it too
            tokenizers = {f"kernel-docs ({SCALES[scale]['vocab_size']:,})": data_dir(scale, runs), **tokenizers}
    print(f"# in-process: bpe.Tokenizer.from_dir(...).encode(text) for each tokenizer x corpus; "
          f"tokenizers {', '.join(rel(p) for p in tokenizers.values())}")
    if run.dry_run:
        return
    toks = {name: bpe.Tokenizer.from_dir(path) for name, path in tokenizers.items()}
    gpt2 = shared / "fixtures"
    if (gpt2 / "gpt2_vocab.json").is_file():  # OpenAI's GPT-2 50K tokenizer: the contrast of a web-text vocabulary
        toks["gpt2 (50K)"] = bpe.Tokenizer.from_files(gpt2 / "gpt2_vocab.json", gpt2 / "gpt2_merges.txt", [EOT])
    texts = {name: path.read_text(encoding="utf-8") for name, path in corpora.items()}
    head = "| tokenizer (trained on) | vocab | " + " | ".join(f"bytes/token on {c}" for c in texts) + \
           " | encode MB/s, cold (kernel-docs valid) | warm |"
    lines = [head, "|---|---:|" + "---:|" * len(texts) + "---:|---:|"]
    for name, tok in toks.items():
        ratios = []
        for cname, text in texts.items():
            fresh = bpe.Tokenizer(tok.vocab, tok.merges, tok.special_tokens)  # cold caches for every measurement
            t0 = time.perf_counter()
            n = len(fresh.encode(text))
            cold = time.perf_counter() - t0
            ratios.append(len(text.encode("utf-8")) / n)
            if cname == next(iter(texts)):
                t0 = time.perf_counter()
                fresh.encode(text)
                warm = time.perf_counter() - t0
                mb = len(text.encode("utf-8")) / 1e6
                speeds = (mb / cold, mb / warm)
        lines.append(f"| {name} | {tok.vocab_size:,} | " + " | ".join(f"{r:.2f}" for r in ratios) +
                     f" | {speeds[0]:.2f} | {speeds[1]:.2f} |")
    longest = ["", "Longest tokens (bytes, as Python string literals):", ""]
    for name, tok in toks.items():
        top = sorted(tok.vocab.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:8]
        longest.append(f"- {name}: " + ", ".join(f"`{b.decode('utf-8', 'replace')!r}` ({len(b)})" for _, b in top))
    text = (f"<!-- written by `python experiments/run.py tokenizer --{scale}` -->\n{machine_line(scale)}\n\n"
            + "\n".join(lines) + "\n" + "\n".join(longest) + "\n")
    save_result("tokenizer", scale, text)


# ---------------------------------------------------------------------------------------------------------------
# Generation (§7.4-style samples) and accounting (§3.6: predicted vs measured step time)
# ---------------------------------------------------------------------------------------------------------------


def finished_records(scale: str, runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((runs / scale).glob("*/result.json"))]


def study_generate(scale, runs, run, force=False) -> None:
    """Samples from the run with the lowest whole-split validation loss, at two temperature / top-p settings."""
    done = [r for r in finished_records(scale, runs) if r.get("val_loss_full") is not None]
    best = min(done, key=lambda r: r["val_loss_full"]) if done else {"name": "base-s0", "val_loss_full": None}
    ckpt = runs / scale / best["name"] / "last.pt"
    out = [f"<!-- written by `python experiments/run.py generate --{scale}` -->",
           f"Best run: `{best['name']}` (whole-split val loss {fmt(best['val_loss_full'], '.4f')}).", ""]
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        cmd = ["python", "sample.py", rel(ckpt), "--prompt", SCALES[scale]["prompt"], "--temperature",
               str(temperature), "--top-p", str(top_p), "--max-new-tokens", "160", "--seed", "0",
               "--device", SCALES[scale]["device"]]
        _, text = run(cmd)
        out += [f"`python {shlex.join(cmd[1:])}`", "", "```", text.strip(), "```", ""]
    if not run.dry_run:
        save_result("generate", scale, "\n".join(out))


def study_accounting(scale, runs, run, force=False) -> None:
    """accounting.py --compare (the GPT-2 family), then predicted vs measured step time of this scale's runs:
    predicted = train_flops_per_token x tokens/step / measured matmul peak (lib.measure.measure_matmul_flops)."""
    _, compare = run(["python", "accounting.py", "--compare"])
    if run.dry_run:
        return
    import torch
    import accounting
    from lib import measure
    from model import ModelConfig
    peak = statistics.median(measure.measure_matmul_flops(device=SCALES[scale]["device"], dtype=torch.float32)
                             for _ in range(3))
    rows = ["| run | train FLOPs/token | tokens/step | predicted ms/step | measured ms/step (median) | "
            "predicted / measured |", "|---|---:|---:|---:|---:|---:|"]
    for r in finished_records(scale, runs):
        cfg_json = json.loads((runs / scale / r["name"] / "config.json").read_text())
        cfg = ModelConfig(**{f.name: cfg_json[f.name] for f in dataclasses.fields(ModelConfig)})
        fpt = accounting.train_flops_per_token(cfg)
        tokens = cfg_json["batch_size"] * cfg.context_length
        predicted = 1000 * fpt * tokens / peak
        if r["ms_per_step"]:
            rows.append(f"| {r['name']} | {fpt / 1e6:.2f} M | {tokens:,} | {predicted:.1f} | {r['ms_per_step']:.1f} | "
                        f"{predicted / r['ms_per_step']:.2f} |")
    text = (f"<!-- written by `python experiments/run.py accounting --{scale}` -->\n{machine_line(scale)}\n\n"
            f"`python accounting.py --compare`:\n\n```\n{compare.strip()}\n```\n\n"
            f"Measured fp32 matmul peak (median of 3 x `lib.measure.measure_matmul_flops`, best-of-1 s each): "
            f"{peak / 1e9:.1f} GFLOP/s.\n\n" + "\n".join(rows) + "\n")
    save_result("accounting", scale, text)


# ---------------------------------------------------------------------------------------------------------------

TRAINING_STUDIES = {"lr": study_lr, "batch": study_batch, "ablations": study_ablations, "noise": study_noise,
                    "generate": study_generate, "accounting": study_accounting}
STUDIES = ["prep", "tokenizer", *TRAINING_STUDIES]


def main(argv=None) -> int:
    p = OneLineParser(prog="experiments/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=STUDIES + ["all"])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="scale", action="store_const", const="quick",
                      help="CPU smoke scale: kernel-docs, small model, 1-2 minutes per run (default)")
    size.add_argument("--cpu", dest="scale", action="store_const", const="cpu",
                      help="CPU scale for real results: 2K-vocab kernel-docs, >= 3M tokens and <= ~5 min per run")
    size.add_argument("--full", dest="scale", action="store_const", const="full",
                      help="the handout's GPU scale: TinyStories, 17M model, 327M tokens per run")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    p.add_argument("--shared", default=None, help="the course data directory (default $CS336_SHARED or ../shared)")
    p.add_argument("--runs", default=str(REPO / "runs" / "experiments"), help="where runs and data go "
                   "(default runs/experiments)")
    a = p.parse_args(argv)
    scale, runs, shared, run = a.scale or "quick", Path(a.runs), shared_dir(a.shared), Runner(a.dry_run)
    t0 = time.time()
    for study in (STUDIES if a.study == "all" else [a.study]):
        print(f"\n## {study} ({scale})", flush=True)
        if study == "prep":
            prep(scale, runs, shared, run)
        elif study == "tokenizer":
            study_tokenizer(scale, runs, run, shared, a.force)
        else:
            TRAINING_STUDIES[study](scale, runs, run, a.force)
    print(f"\n# done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
