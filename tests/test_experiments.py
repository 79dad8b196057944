"""Checks experiments/run.py, the driver of the studies in EXPERIMENTS.md: its command line (help, misuse); that every
train.py command it would run at the handout's scale is accepted by train.py's own argument resolution (token budget,
ablations, the SiLU run's d_ff = 4 d_model); its machine line; and that a tiny real configuration runs end to end
(train.py subprocess, the whole-split validation loss, the result record, reuse of a finished run, the table) in
tmp_path.

    python -m pytest tests/test_experiments.py     # all of this file's checks (CPU, a few seconds)
    python -m pytest -m slow                       # the project's slow checks (this file has none)
"""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lib.runs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "run.py"


@pytest.fixture(scope="module")
def run_py():
    spec = importlib.util.spec_from_file_location("experiments_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing runs nothing: main() is under `if __name__ == "__main__"`
    return module


def test_help_and_misuse():
    ok = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "ablations" in ok.stdout and "--full" in ok.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "nosuchstudy"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    both = subprocess.run([sys.executable, str(SCRIPT), "lr", "--quick", "--full"], capture_output=True, text=True)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_full_dry_run_commands_are_valid_train_py_invocations(run_py, capsys, tmp_path):
    """Every printed train.py line resolves through train.py's parser and model-config checks (so no flag is
    misspelt and every ablation is a valid ModelConfig); the token budget is the handout's 327,680,000 tokens."""
    assert run_py.main(["all", "--full", "--dry-run", "--runs", str(tmp_path), "--shared", str(tmp_path)]) == 0
    lines = [line[2:] for line in capsys.readouterr().out.splitlines() if line.startswith("$ python train.py --")]
    assert len(lines) >= 15
    budgets, ablations = set(), set()
    for line in lines:
        args, ckpt = lib.runs.resolve_args(shlex.split(line)[2:])
        cfg = lib.runs.resolve_model_config(args, ckpt, None)
        budgets.add(args["batch_size"] * cfg.context_length * args["max_iters"])
        ablations.add((cfg.norm, cfg.position, cfg.ffn))
        assert cfg.d_ff == (4 * cfg.d_model if cfg.ffn == "silu" else run_py.SCALES["full"]["model"]["d_ff"])
        assert args["eval_iters"] * args["batch_size"] == run_py.SCALES["full"]["eval_windows"]
    assert budgets == {327_680_000}
    assert ablations == {("pre", "rope", "swiglu"), ("none", "rope", "swiglu"), ("post", "rope", "swiglu"),
                         ("pre", "nope", "swiglu"), ("pre", "rope", "silu")}


def test_cpu_dry_run_sweeps_every_arm_at_3m_tokens(run_py, capsys, tmp_path):
    """--cpu: the tokenizer study includes the 2K vocabulary; every run sees >= 3M tokens on that data; the lr study
    has >= 6 rates; each of >= 4 batch sizes and every ablation arm is trained at several lrs; arms repeat over
    seeds; no two commands share a run directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kernel-docs-train.txt").write_text("prep only checks that the corpus is there")
    assert run_py.main(["all", "--cpu", "--dry-run", "--runs", str(tmp_path), "--shared", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tokenizer_study = next(line for line in out.splitlines() if line.startswith("# in-process: bpe.Tokenizer"))
    assert "kernel-docs-2k" in tokenizer_study  # the tokenizer study covers the vocabulary these runs train on
    lines = [line[2:] for line in out.splitlines() if line.startswith("$ python train.py --")]
    lines_of, runs_of = {}, {}
    for line in lines:
        args, ckpt = lib.runs.resolve_args(shlex.split(line)[2:])
        cfg = lib.runs.resolve_model_config(args, ckpt, None)
        assert args["batch_size"] * cfg.context_length * args["max_iters"] >= 3_000_000
        assert args["data"].endswith("kernel-docs-2k")  # train.py takes the vocab size (2,048) from its tokenizer
        assert lines_of.setdefault(args["out"], line) == line  # a reused name is the same run
        runs_of[args["out"]] = (args, cfg)
    s = run_py.SCALES["cpu"]
    runs = list(runs_of.values())
    assert len({a["lr"] for a, c in runs if a["batch_size"] == s["batch_size"] and c.norm == "pre" and
                c.position == "rope" and c.ffn == "swiglu" and a["seed"] == 0}) >= 6
    batches = {}
    for a, c in runs:
        batches.setdefault(a["batch_size"], set()).add(a["lr"])
    assert len(batches) >= 4 and all(len(lrs) >= 3 for lrs in batches.values())
    for field, value in (("norm", "none"), ("norm", "post"), ("position", "nope"), ("ffn", "silu")):
        arm = [(a["lr"], a["seed"]) for a, c in runs if getattr(c, field) == value]
        assert len({lr for lr, _ in arm}) >= 3 and len({seed for _, seed in arm}) >= 2, field


def test_machine_line_is_accountings_plus_device_and_time(run_py):
    from lib import measure
    line = run_py.machine_line("full")
    assert line.startswith(f"Machine: {measure.machine_line()}; device cuda; ")
    assert re.search(r"; \d{4}-\d\d-\d\d \d\d:\d\d UTC\.$", line)


def test_tiny_run_end_to_end(run_py, tmp_path, monkeypatch):
    """A real (tiny) run through the driver: the record's whole-split val loss is sample.py's, and matches the
    loss train.py logged on the same windows (the validation split here is smaller than the eval windows, so
    train.py's evaluation covers all of it too)."""
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(0, 64, 5000, dtype=np.uint16))
    np.save(data / "valid.npy", rng.integers(0, 64, 16 * 8 + 1, dtype=np.uint16))  # 8 windows of 16
    tiny = dict(model=dict(vocab_size=64, context_length=16, d_model=16, num_layers=1, num_heads=2, d_ff=48),
                batch_size=4, max_iters=6, lr=1e-2, warmup_frac=0.2, evals=2, eval_windows=8, device="cpu",
                extra=["--peak-flops", "0"], data="toy", prompt="")
    monkeypatch.setitem(run_py.SCALES, "tiny", tiny)
    runner = run_py.Runner(dry_run=False)  # paths outside the repository are passed to train.py as absolute ones
    record = run_py.train_run("tiny", tmp_path, runner, "base-s0")
    assert record["steps"] == 6 and record["tokens"] == 6 * 4 * 16
    # random ids hold nothing to learn beyond their frequencies, and the outcome says so
    assert record["outcome"].startswith("stalled: no better than token frequencies")
    assert record["val_loss_full"] == pytest.approx(record["val_loss_subset"], abs=1e-3)
    assert record["val_loss_full"] < record["val_loss_0"]
    again = run_py.train_run("tiny", tmp_path, runner, "base-s0")  # same command: reused, not retrained
    assert again == record
    table = run_py.runs_table([record])
    assert f"**{record['val_loss_full']:.3f}**" in table and "| base-s0 | baseline | 6 |" in table


def test_unigram_line_and_ablation_summary(run_py, tmp_path):
    """The "knows only token frequencies" loss is the add-one unigram of train.npy scored on valid.npy's targets;
    the ablation summary and its plot read each arm's seeds against the baseline's range."""
    data = tmp_path / "data" / "toy"
    data.mkdir(parents=True)
    np.save(data / "train.npy", np.array([0, 0, 0, 1], dtype=np.uint16))
    np.save(data / "valid.npy", np.array([1, 0, 1], dtype=np.uint16))
    run_py.SCALES["toy"] = dict(run_py.SCALES["cpu"], data="toy")
    try:
        # counts + 1: token 0 -> 4/6, token 1 -> 2/6; targets (valid[1:]) are 0 and 1
        assert run_py.unigram_loss("toy", tmp_path) == pytest.approx(-(np.log(4 / 6) + np.log(2 / 6)) / 2)
    finally:
        del run_py.SCALES["toy"]
    rec = lambda loss, lr, seed=0: {"val_loss_full": loss, "changes": {"lr": lr, "seed": seed}}  # noqa: E731
    best = [("baseline", [rec(3.0, 0.02), rec(3.1, 0.02, 1)]), ("nope", [rec(3.2, 0.01), rec(3.3, 0.01, 1)])]
    text = run_py.ablation_summary(best, "cpu")
    assert "span 0.100 nats" in text and "| nope | 0.01 | 3.200, 3.300 | 3.250 | +0.200 |" in text
    pytest.importorskip("matplotlib")
    run_py.plot_ablations(best, "cpu", tmp_path / "summary.png")
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outcome_flags_a_validation_curve_that_climbs_back(run_py):
    """An lr above the edge of stability rarely reaches nan under Adam and clipping: its validation curve (fixed
    windows, so noise-free between evals) climbs back up. A rise of more than RISE_NATS above the best so far is
    "unstable"; a curve that only falls, or wobbles by less, is "ok"."""
    curve = lambda *losses: [{"step": 10 * i, "val_loss": x} for i, x in enumerate(losses)]  # noqa: E731
    rise = run_py.largest_rise(curve(7.7, 6.1, 6.2, 6.35, 6.0, 5.7))
    assert rise == {"nats": pytest.approx(0.25), "from_step": 10, "from_loss": 6.1, "to_step": 30, "to_loss": 6.35}
    assert run_py.largest_rise(curve(7.7, 5.0, 4.0)) is None
    record = dict(val_loss_0=7.7, val_loss_full=5.8, val_loss_subset=5.7, max_train_loss=7.6, max_train_loss_step=5)
    assert run_py.outcome({**record, "val_rise": rise}).startswith("unstable: val loss rose from 6.10 (step 10) "
                                                                    "to 6.35 (step 30), then fell again")
    small = run_py.largest_rise(curve(7.7, 4.0, 4.05, 3.9))
    assert run_py.outcome({**record, "val_rise": small}) == "ok"
    # a run that ends at the unigram line's loss learned only token frequencies (post-norm at too large an lr)
    stalled = run_py.outcome({**record, "val_rise": None}, unigram=5.83)
    assert stalled == "stalled: no better than token frequencies (5.83)"
    assert run_py.outcome({**record, "val_rise": None}, unigram=6.5) == "ok"


def test_a_sweep_whose_best_is_at_an_end_goes_one_lr_further(run_py):
    """The best lr of a sweep must lie inside it: while the lowest loss is at an end, one more lr beyond that end
    (same ratio as to its neighbour), at most MAX_SWEEP_EXTENSIONS times; a bracketed sweep runs nothing more."""
    def sweep(best_lr):
        trained = []
        def train_at(lr):
            trained.append(lr)
            return {"changes": {"lr": lr}, "val_loss_full": 3.0 + abs(np.log(lr / best_lr))}
        records = run_py.sweep_to_minimum("cpu", train_at, [0.005, 0.01, 0.02])
        assert [r["changes"]["lr"] for r in records] == sorted(trained)
        return trained
    assert sweep(0.01) == [0.005, 0.01, 0.02]
    assert sweep(0.004) == [0.005, 0.01, 0.02, 0.0025]  # one step down, and 0.0025 is now bracketed by 0.005
    assert sweep(0.5) == [0.005, 0.01, 0.02, 0.04, 0.08]  # still at the top after two steps: it stops there
