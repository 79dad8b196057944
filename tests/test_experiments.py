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

import train

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
        args, ckpt = train.resolve_args(shlex.split(line)[2:])
        cfg = train.resolve_model_config(args, ckpt, None)
        budgets.add(args["batch_size"] * cfg.context_length * args["max_iters"])
        ablations.add((cfg.norm, cfg.position, cfg.ffn))
        assert cfg.d_ff == (4 * cfg.d_model if cfg.ffn == "silu" else run_py.SCALES["full"]["model"]["d_ff"])
        assert args["eval_iters"] * args["batch_size"] == run_py.SCALES["full"]["eval_windows"]
    assert budgets == {327_680_000}
    assert ablations == {("pre", "rope", "swiglu"), ("none", "rope", "swiglu"), ("post", "rope", "swiglu"),
                         ("pre", "nope", "swiglu"), ("pre", "rope", "silu")}


def test_machine_line_is_accountings_plus_device_and_time(run_py):
    import accounting
    line = run_py.machine_line("full")
    assert line.startswith(f"Machine: {accounting.machine_line()}; device cuda; ")
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
    assert record["outcome"] == "ok" and record["steps"] == 6 and record["tokens"] == 6 * 4 * 16
    assert record["val_loss_full"] == pytest.approx(record["val_loss_subset"], abs=1e-3)
    assert record["val_loss_full"] < record["val_loss_0"]
    again = run_py.train_run("tiny", tmp_path, runner, "base-s0")  # same command: reused, not retrained
    assert again == record
    table = run_py.runs_table([record])
    assert f"**{record['val_loss_full']:.3f}**" in table and "| base-s0 | baseline | 6 |" in table
