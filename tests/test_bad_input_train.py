"""train.py's bad-input table (issue 32): training flags, --config, --resume and plot. One row = the command, what it
is given, the exit code, the whole stderr line word for word, and the files that must not exist or must be unchanged
afterwards (conftest.BadInput). Every row runs in-process and fails before or at its first step, so the table takes
seconds; nothing in it depends on timing.

Each row's scratch directory d holds `data` (conftest's counting_data: ids mod 32, for the TINY_RUN model) and `demo`
(a copy of the quick demo: demo/data with its 300-token tokenizer, demo/run with last.pt and best.pt at step 20,
separate files). Below the table: the successes the messages point to (resuming from best.pt, a damaged log that
is kept aside and does not stop a resume, plot skipping unreadable rows).

    python -m pytest tests/test_bad_input_train.py -q
"""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from conftest import TINY_RUN, BadInput, check_bad_input, run_cli
from lib.runs import parse_log

TINY = [*TINY_RUN, "--device", "cpu"]
RUN = "{d}/demo/run"  # the quick demo's run: last.pt and best.pt at step 20
FRESH = ["--data", "{d}/data", "--out", "{d}/run", "--max-iters", "2", *TINY]  # a tiny fresh run into d/run
DEMO_RUN = ["--eval-iters", "1", "--peak-flops", "0", "--device", "cpu"]  # quick extras for a demo-model run


# ---------------------------------------------------------------------------------------------------------------
# setups: each builds one bad input in the row's scratch directory d
# ---------------------------------------------------------------------------------------------------------------


def write(name: str, content):
    """A setup writing `content` (text, bytes, or a JSON-able value) to d/name, making its directory."""
    def setup(d: Path):
        path = d / name.format(d=d)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content).replace("{d}", str(d)))
    return setup


def steps(*setups):
    def setup(d: Path):
        for s in setups:
            s(d)
    return setup


def mkdir(name: str):
    return lambda d: (d / name).mkdir(parents=True)


def bad_ids(name: str, token_id: int):
    """d/name: a .npy of 1,000 copies of token_id (outside the model's vocabulary): found by the first batch read."""
    return lambda d: np.save(d / name, np.full(1000, token_id, dtype=np.uint16))


def truncate(name: str):
    """Cut d/name to half its bytes, as a crash of the file system might (a new file: a hard link keeps its bytes)."""
    def setup(d: Path):
        data = (d / name).read_bytes()
        (d / name).unlink()
        (d / name).write_bytes(data[: len(data) // 2])
    return setup


def edit_checkpoint(name: str, change, to: str | None = None):
    """Load d/name, change(ckpt), save it to d/`to` (default: in place)."""
    def setup(d: Path):
        ckpt = torch.load(d / name, weights_only=True)
        change(ckpt)
        (d / (to or name)).parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, d / (to or name))
    return setup


def nan_weights(ckpt):
    ckpt["model"]["lm_head.weight"].fill_(float("nan"))


def damage_log(d: Path):
    """Four damaged rows in the middle of the demo run's log.jsonl: no step, garbage, a non-numeric loss, and a
    byte that is not UTF-8."""
    log = d / "demo/run/log.jsonl"
    lines = log.read_bytes().split(b"\n")
    lines[1:1] = [b'{"loss": 3.0, "time": 1.0}', b"garbage", b'{"step": 7, "loss": "abc"}', b'{"step": 8, "loss": \xff}']
    log.write_bytes(b"\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------------

E = "train.py: error: "
STOP = "train.py: stopped: "
BAD_IDS = ("is outside the model's vocabulary [0, {vocab}): the data was encoded with another tokenizer (use matching "
           "data, or the tokenizer's --vocab-size)")
WANDB = "give a name (e.g. --wandb cs336), or leave the flag out"

ROWS = [
    # the command line (argparse)
    BadInput("unknown-flag", ["--bogus"], 2, E + "unrecognized arguments: --bogus (see --help)"),
    BadInput("int-flag-not-an-int", [*FRESH, "--max-iters", "many"], 2,
             E + "argument --max-iters: invalid int value: 'many' (see --help)", absent=("run",)),
    BadInput("choice-not-offered", [*FRESH, "--norm", "middle"], 2,
             E + "argument --norm: invalid choice: 'middle' (choose from <*>) (see --help)", absent=("run",)),
    # flags that do not fit together (check_args): refused before anything is read or written
    BadInput("no-data", ["--out", "{d}/run"], 2,
             E + "--data is required: a .npy of token ids or a `bpe.py prepare` directory (or run `python train.py` "
                 "with no arguments for the offline demo)", absent=("run",)),
    BadInput("data-missing", ["--data", "{d}/nope.npy", "--out", "{d}/run", *TINY], 2,
             E + "data file {d}/nope.npy does not exist (make one with `python bpe.py prepare tinystories`)",
             absent=("run",)),
    BadInput("max-iters-0", [*FRESH, "--max-iters", "0"], 2, E + "--max-iters must be >= 1, got 0", absent=("run",)),
    BadInput("batch-not-divisible", [*FRESH, "--batch-size", "6", "--grad-accum", "4"], 2,
             E + "--batch-size 6 is not divisible by --grad-accum 4", absent=("run",)),
    BadInput("warmup-past-the-cycle", [*FRESH, "--warmup-iters", "50"], 2,
             E + "--warmup-iters 50 must be <= the cosine cycle (2 steps)", absent=("run",)),
    BadInput("grad-clip-negative", [*FRESH, "--grad-clip", "-1"], 2,
             E + "--grad-clip must be >= 0 (0 = no clipping), got -1.0", absent=("run",)),
    BadInput("lr-0", [*FRESH, "--lr", "0"], 2,
             E + "need 0 <= --min-lr (0.0003) <= --lr (0.0) and --lr > 0", absent=("run",)),
    BadInput("fsdp-without-torchrun", [*FRESH, "--fsdp"], 2,
             E + "--fsdp shards over the processes torchrun starts: run it as `torchrun --nproc_per_node N train.py "
                 "... --fsdp` (or pass --no-fsdp, e.g. to resume an FSDP run in one process)", absent=("run",)),
    BadInput("wandb-run-without-wandb", [*FRESH, "--wandb-run", "r1"], 2,
             E + "--wandb-run names a run of --wandb PROJECT: give --wandb too", absent=("run",)),
    BadInput("wandb-empty", [*FRESH, "--wandb", ""], 2,
             E + f"--wandb names a W&B project: got ''; {WANDB}", absent=("run",)),
    BadInput("wandb-blank", [*FRESH, "--wandb", "  "], 2,
             E + f"--wandb names a W&B project: got '  '; {WANDB}", absent=("run",)),
    BadInput("wandb-run-empty", [*FRESH, "--wandb", "cs336", "--wandb-run", ""], 2,
             E + f"--wandb-run names a W&B run: got ''; {WANDB}", absent=("run",)),
    BadInput("out-is-a-file", [*FRESH[:2], "--out", "{d}/notes.txt", *FRESH[4:]], 2,
             E + "--out {d}/notes.txt is a file, not a directory; pick another --out (a directory, made if missing)",
             setup=write("notes.txt", "mine"), unchanged=("notes.txt",)),
    BadInput("out-under-a-file", [*FRESH[:2], "--out", "{d}/notes.txt/run", *FRESH[4:]], 2,
             E + "--out {d}/notes.txt/run: {d}/notes.txt is a file, not a directory; pick another --out (a "
                 "directory, made if missing)", setup=write("notes.txt", "mine"), unchanged=("notes.txt",)),
    # --config FILE.json: the same types and checks as the command line; nothing written
    BadInput("config-missing", ["--config", "{d}/nope.json"], 2, E + "--config file {d}/nope.json does not exist"),
    BadInput("config-not-json", ["--config", "{d}/c.json"], 2,
             E + "--config file {d}/c.json is not valid JSON (<*>)", setup=write("c.json", "{not json")),
    BadInput("config-not-utf8", ["--config", "{d}/c.json"], 2,
             E + "--config file {d}/c.json is not valid JSON (<*>)", setup=write("c.json", b'{"lr": "\xff"}')),
    BadInput("config-not-an-object", ["--config", "{d}/c.json"], 2,
             E + "--config file {d}/c.json must hold a JSON object of flag names to values", setup=write("c.json", [1])),
    BadInput("config-unknown-key", ["--config", "{d}/c.json"], 2,
             E + "--config {d}/c.json: unknown key 'learning_rate' (keys are flag names such as 'd_model')",
             setup=write("c.json", {"learning_rate": 1})),
    BadInput("config-int-as-string", ["--config", "{d}/c.json"], 2,
             E + "--config {d}/c.json: max_iters must be an integer",
             setup=write("c.json", {"data": "{d}/data", "out": "{d}/run", "max_iters": "ten"}), absent=("run",)),
    BadInput("config-switch-as-string", ["--config", "{d}/c.json"], 2,
             E + "--config {d}/c.json: tie_embeddings must be JSON true or false, got 'false'",
             setup=write("c.json", {"data": "{d}/data", "out": "{d}/run", "tie_embeddings": "false"}), absent=("run",)),
    BadInput("config-number-as-bool", ["--config", "{d}/c.json"], 2, E + "--config {d}/c.json: lr must be a number",
             setup=write("c.json", {"lr": True})),
    BadInput("config-path-as-number", ["--config", "{d}/c.json"], 2,
             E + "--config {d}/c.json: data must be a string, got 5",
             setup=write("c.json", {"data": 5, "out": "{d}/run"}), absent=("run",)),
    BadInput("config-not-a-choice", ["--config", "{d}/c.json"], 2,
             E + "--config {d}/c.json: dtype must be one of bf16, fp16, fp32, got 'fp8'",
             setup=write("c.json", {"dtype": "fp8"})),
    BadInput("config-wandb-empty", ["--config", "{d}/c.json", *TINY], 2,
             E + f"--wandb names a W&B project: got ''; {WANDB}",
             setup=write("c.json", {"data": "{d}/data", "out": "{d}/run", "wandb": ""}), absent=("run",)),
    BadInput("config-value-out-of-range", ["--config", "{d}/c.json", *TINY], 2, E + "--max-iters must be >= 1, got 0",
             setup=write("c.json", {"data": "{d}/data", "out": "{d}/run", "max_iters": 0}), absent=("run",)),
    # a data problem found only by the first batch, after the run directory was made: it leaves nothing behind
    BadInput("bad-ids-new-out", ["--data", "{d}/ids.npy", "--out", "{d}/a/b/run", "--max-iters", "2", *TINY], 2,
             E + "token id 40 at position <*> of {d}/ids.npy " + BAD_IDS.format(vocab=32),
             setup=bad_ids("ids.npy", 40), absent=("a",)),
    BadInput("bad-ids-empty-out", ["--data", "{d}/ids.npy", "--out", "{d}/run", "--max-iters", "2", *TINY], 2,
             E + "token id 40 at position <*> of {d}/ids.npy " + BAD_IDS.format(vocab=32),
             setup=steps(bad_ids("ids.npy", 40), mkdir("run")), unchanged=("run",)),
    BadInput("bad-ids-out-with-files", ["--data", "{d}/ids.npy", "--out", "{d}/run", "--max-iters", "2", *TINY], 2,
             E + "token id 40 at position <*> of {d}/ids.npy " + BAD_IDS.format(vocab=32),
             setup=steps(bad_ids("ids.npy", 40), write("run/notes.txt", "mine"), write("run/draft.tmp", "mine")),
             unchanged=("run",)),
    BadInput("bad-ids-resume", ["--resume", RUN, "--data", "{d}/ids.npy", "--max-iters", "22"], 2,
             E + "token id 400 at position <*> of {d}/ids.npy " + BAD_IDS.format(vocab=300),
             setup=bad_ids("ids.npy", 400), unchanged=("demo/run",)),
    BadInput("bad-ids-resume-damaged-log", ["--resume", RUN, "--data", "{d}/ids.npy", "--max-iters", "22"], 2,
             E + "token id 400 at position <*> of {d}/ids.npy " + BAD_IDS.format(vocab=300),
             setup=steps(bad_ids("ids.npy", 400), damage_log), unchanged=("demo/run",)),
    # --resume: what is there to continue from
    BadInput("resume-empty-dir", ["--resume", "{d}/empty"], 2,
             E + "--resume {d}/empty: no checkpoint {d}/empty/last.pt to resume from", setup=mkdir("empty"),
             unchanged=("empty",)),
    BadInput("resume-missing-dir", ["--resume", "{d}/nope"], 2,
             E + "--resume {d}/nope: no checkpoint {d}/nope/last.pt to resume from", absent=("nope",)),
    BadInput("resume-and-init-from", ["--resume", RUN, "--init-from", RUN + "/last.pt"], 2,
             E + "--init-from starts a new run and --resume continues one: give only one of them",
             unchanged=("demo/run",)),
    BadInput("resume-truncated-last", ["--resume", RUN], 2,
             E + "checkpoint {d}/demo/run/last.pt is corrupt or not a train.py checkpoint (<*>); {d}/demo/run/best.pt "
                 "(step 20) is intact: continue from it with `python train.py --resume {d}/demo/run/best.pt`",
             setup=truncate("demo/run/last.pt"), unchanged=("demo/run",)),
    BadInput("resume-truncated-last-and-best", ["--resume", RUN], 2,
             E + "checkpoint {d}/demo/run/last.pt is corrupt or not a train.py checkpoint (<*>); no intact checkpoint "
                 "is left to resume: start the run again with `python train.py --config {d}/demo/run/config.json "
                 "--overwrite`",
             setup=steps(truncate("demo/run/last.pt"), truncate("demo/run/best.pt")), unchanged=("demo/run",)),
    BadInput("resume-truncated-best", ["--resume", RUN + "/best.pt"], 2,
             E + "checkpoint {d}/demo/run/best.pt is corrupt or not a train.py checkpoint (<*>); {d}/demo/run/last.pt "
                 "(step 20) is intact: continue from it with `python train.py --resume {d}/demo/run/last.pt`",
             setup=truncate("demo/run/best.pt"), unchanged=("demo/run",)),
    BadInput("resume-not-a-checkpoint", ["--resume", RUN + "/config.json"], 2,
             E + "checkpoint {d}/demo/run/config.json is corrupt or not a train.py checkpoint (<*>); "
                 "{d}/demo/run/last.pt (step 20) is intact: continue from it with `python train.py --resume "
                 "{d}/demo/run/last.pt`", unchanged=("demo/run",)),
    BadInput("resume-checkpoint-outside-a-run", ["--resume", "{d}/x/ckpt.pt"], 2,
             E + "--resume {d}/x/ckpt.pt: {d}/x is not a run directory (no config.json); start a new run from this "
                 "checkpoint's weights with --init-from {d}/x/ckpt.pt",
             setup=edit_checkpoint("demo/run/last.pt", lambda c: None, to="x/ckpt.pt"), unchanged=("x",)),
    BadInput("resume-weights-only", ["--resume", RUN], 2,
             E + "--resume {d}/demo/run: {d}/demo/run/last.pt holds weights but no training state; start a new run "
                 "from it with --init-from {d}/demo/run/last.pt",
             setup=edit_checkpoint("demo/run/last.pt", lambda c: c.pop("rng")), unchanged=("demo/run",)),
    # a nan/inf loss before any update: the weights or the data, not the learning rate
    BadInput("nan-weights-init-from", ["--init-from", "{d}/nan.pt", "--data", "{d}/demo/data", "--out", "{d}/new",
                                       "--max-iters", "2", "--warmup-iters", "1", "--batch-size", "2", *DEMO_RUN], 1,
             STOP + "the loss was nan/inf at step 1, before any update: the starting weights (--init-from "
                    "{d}/nan.pt) or the data are bad, not the learning rate",
             setup=edit_checkpoint("demo/run/last.pt", nan_weights, to="nan.pt")),
    BadInput("nan-weights-resume", ["--resume", RUN, "--max-iters", "22", "--batch-size", "2", *DEMO_RUN], 1,
             STOP + "the loss was nan/inf at step 21, before any update: the starting weights (the checkpoint resumed "
                    "at step 20) or the data are bad, not the learning rate",
             setup=edit_checkpoint("demo/run/last.pt", nan_weights),
             unchanged=("demo/run/last.pt", "demo/run/best.pt", "demo/run/log.jsonl")),
]

PLOT_ROWS = [  # `train.py plot`; <formats> stands for the image formats matplotlib can write, listed in the message
    BadInput("plot-unknown-format", ["plot", RUN, "-o", "{d}/curves.jpgg"], 2,
             E + "-o {d}/curves.jpgg: unknown image format '.jpgg'; name the file with one of <formats>",
             absent=("curves.jpgg", "curves.jpgg.tmp")),
    BadInput("plot-output-is-a-directory", ["plot", RUN, "-o", "{d}/demo"], 2,
             E + "-o {d}/demo is a directory: name the image file, e.g. -o {d}/demo/curves.png",
             unchanged=("demo",)),
    BadInput("plot-output-directory-missing", ["plot", RUN, "-o", "{d}/nope/curves.png"], 2,
             E + "-o {d}/nope/curves.png: directory {d}/nope does not exist; make it or pick another -o",
             absent=("nope",)),
    BadInput("plot-no-run", ["plot"], 2,
             "train.py plot: error: the following arguments are required: RUN_DIR (see --help)"),
    BadInput("plot-not-a-run", ["plot", "{d}/data", "-o", "{d}/c.png"], 2,
             E + "{d}/data has no log.jsonl rows to plot (is it a train.py run directory?)", absent=("c.png",)),
    BadInput("plot-missing-run", ["plot", RUN, "{d}/nope", "-o", "{d}/c.png"], 2,
             E + "{d}/nope has no log.jsonl rows to plot (is it a train.py run directory?)", absent=("c.png",)),
    BadInput("plot-row-without-step", ["plot", "{d}/r", "-o", "{d}/c.png"], 2,
             E + "{d}/r/log.jsonl has no readable rows to plot (line 1 damaged)",
             setup=write("r/log.jsonl", b'{"loss": 3.0, "time": 1.0}\n'), absent=("c.png",)),
    BadInput("plot-row-not-utf8", ["plot", "{d}/r", "-o", "{d}/c.png"], 2,
             E + "{d}/r/log.jsonl has no readable rows to plot (line 1 damaged)",
             setup=write("r/log.jsonl", b'{"step": 1, "loss": 3.0, "note": "\xff"}\n'), absent=("c.png",)),
    BadInput("plot-only-damaged-rows", ["plot", "{d}/r", "-o", "{d}/c.png"], 2,
             E + "{d}/r/log.jsonl has no readable rows to plot (lines 1, 2 damaged)",
             setup=write("r/log.jsonl", b'{"step": "one", "loss": 1.0}\n{"step": 2, "loss": "abc"}\n'),
             absent=("c.png",)),
]


@pytest.fixture
def scratch(tmp_path, quick_demo, counting_data):
    """The row's scratch directory: d/data (counting ids) and d/demo (a copy of the quick demo)."""
    shutil.copytree(quick_demo, tmp_path / "demo")
    return tmp_path


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row, scratch, capsys):
    check_bad_input(row, train.main, scratch, capsys)


@pytest.mark.parametrize("row", PLOT_ROWS, ids=lambda r: r.id)
def test_bad_input_plot(row, scratch, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    formats = ", ".join("." + name for name in sorted(FigureCanvasAgg.get_supported_filetypes()))
    check_bad_input(dataclasses.replace(row, message=row.message.replace("<formats>", formats)), train.main, scratch,
                    capsys)


# ---------------------------------------------------------------------------------------------------------------
# what the messages point to works
# ---------------------------------------------------------------------------------------------------------------


def test_resume_from_best_pt_when_last_pt_is_damaged(scratch, capsys):
    # The truncated-last.pt row suggests `--resume RUN/best.pt`: the run goes on in RUN, from best.pt's step.
    run = scratch / "demo/run"
    truncate("demo/run/last.pt")(scratch)
    code, out, err = run_cli(train.main, ["--resume", run / "best.pt", "--max-iters", 21, *DEMO_RUN], capsys)
    assert code == 0 and err == "", err
    assert f"from step 20 to 21; 256 tokens/step; run dir {run}\n" in out
    assert torch.load(run / "last.pt", weights_only=True)["iteration"] == 21  # last.pt is whole again
    assert [r["step"] for r in parse_log(run / "log.jsonl")[0]][-2:] == [20, 21]


DAMAGED_ROWS = {  # the kinds of damage issue 32 found, each one line in the middle of a log
    "no-step": b'{"loss": 3.0, "time": 1.0}', "garbage": b"garbage", "loss-not-a-number": b'{"step": 7, "loss": "abc"}',
    "not-utf8": b'{"step": 8, "loss": \xff}'}


@pytest.mark.parametrize("kind", [*DAMAGED_ROWS, "all"])
def test_a_damaged_log_is_kept_aside_and_does_not_stop_a_resume(kind, scratch, capsys):
    run = scratch / "demo/run"
    damaged = list(DAMAGED_ROWS.values()) if kind == "all" else [DAMAGED_ROWS[kind]]
    lines = (run / "log.jsonl").read_bytes().split(b"\n")
    (run / "log.jsonl").write_bytes(b"\n".join(lines[:1] + damaged + lines[1:]))
    code, out, err = run_cli(train.main, ["--resume", run, "--max-iters", 21, *DEMO_RUN], capsys)
    assert code == 0
    where = "4 damaged rows (lines 2, 3, 4, 5)" if kind == "all" else "1 damaged row (line 2)"
    assert err == (f"train.py: warning: {run}/log.jsonl: {where} moved to {run}/log.jsonl.damaged; the run resumed "
                   f"from its checkpoint\n")  # one line, once
    assert (run / "log.jsonl.damaged").read_bytes() == b"".join(line + b"\n" for line in damaged)  # byte for byte
    rows, left = parse_log(run / "log.jsonl")
    assert left == [] and [r["step"] for r in rows] == [0, 5, 10, 15, 20, 21]


def test_parse_log_reads_rows_reports_damaged_lines_and_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 0, "val_loss": 5.0}\n\n[1, 2]\n{"step": 1, "loss": NaN}\n{"step": true}\n'
                    b'{"step": 2, "loss": null}\n{"step": 3, "lo')
    rows, damaged = parse_log(log)
    assert [r["step"] for r in rows] == [0, 1]  # (a NaN loss is a number: a diverged run's row, still readable)
    assert damaged == [(3, b"[1, 2]"), (5, b'{"step": true}'), (6, b'{"step": 2, "loss": null}')]
    log.write_bytes(b'{"step": 0}\n{"step": 1}')  # a whole last row that only lacks its newline is kept
    assert parse_log(log) == ([{"step": 0}, {"step": 1}], [])


def test_plot_skips_unreadable_rows_and_says_how_many(scratch, capsys):
    pytest.importorskip("matplotlib")
    damage_log(scratch)
    run, png = scratch / "demo/run", scratch / "curves.png"
    code, out, err = run_cli(train.main, ["plot", run, "-o", png], capsys)
    assert code == 0 and out == f"wrote {png}\n"
    assert err == f"train.py: warning: {run}/log.jsonl: skipped 4 unreadable rows (lines 2, 3, 4, 5)\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("first_step_nan, lrs, words", [
    (True, [0.0, 1e-3, 1e-3], "the loss was nan/inf at step 11, before any update: the starting weights (the checkpoint "
                              "resumed at step 10) or the data are bad, not the learning rate"),
    (False, [0.0, 0.0, 0.0], "the loss became nan/inf by step 13 with every update at lr 0: the starting weights (the "
                             "checkpoint resumed at step 10) or the data are bad, not the learning rate"),
    (False, [0.0, 1e-3, 1e-3], "loss became nan/inf by step 13 (lr 1.00e-03): the learning rate is probably too high, "
                               "try --lr 0.0001; RUN/last.pt (step 10) is the last good checkpoint"),
])
def test_a_lower_lr_is_suggested_only_after_updates_at_lr_above_0(first_step_nan, lrs, words):
    from types import SimpleNamespace
    from lib.runs import Progress, nonfinite_cause
    progress = Progress(step=10, last_saved_step=10).begin(torch.device("cpu"))  # resumed at step 10
    progress.first_step_nonfinite.fill_(first_step_nan)
    progress.step = 13  # three updates, at lrs[0], lrs[1], lrs[2]
    run = SimpleNamespace(out="RUN", args={"lr": 1e-3, "init_from": None}, lr_at=lambda it: lrs[it - 10])
    assert nonfinite_cause(run, progress, lr=1e-3) == words
