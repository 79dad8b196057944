"""Faults while training: a full disk, a failing write or a crash never costs the last good checkpoint or leaves
debris behind.

- A checkpoint write that fails with ENOSPC or EIO part-way (cli.atomic_file's writer, made to fail by the
  `fail_writes` fixture of conftest.py): one line naming the file, the cause and how to continue, exit code 1, no
  temporary file, the previous last.pt untouched and resumable, and the resumed run ends on the uninterrupted curve.
- last.pt is written before best.pt, and best.pt is a hard link of last.pt when they hold the same step (a copy
  where links fail); config.json failures stop the run before it starts; a log.jsonl that cannot be written is
  reported once and training goes on, unless the checkpoints cannot be written either.
- A real 20 MiB tmpfs (root on Linux only, skipped elsewhere) with the demo-size model: the early warning, the
  disk-full stop, and a resume once space is freed.
- Slow: a run killed with SIGKILL at five random moments, some during a checkpoint write, resumed each time, ends
  with a loss curve bitwise equal to an uninterrupted run.

    python -m pytest tests/test_faults_train.py            # the fast fault tests
    python -m pytest -m slow tests/test_faults_train.py    # the SIGKILL soak
"""
import errno
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib import cli
import train
import lib.checkpoints
import lib.runs
from conftest import TINY_RUN, run_losses

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_RUN, "--device", "cpu"]


def run_main(argv, capsys):
    rc = train.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


losses = run_losses


def debris(run_dir):
    return sorted(p.name for p in Path(run_dir).glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# a checkpoint write fails part-way
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("err, cause", [(errno.ENOSPC, "no space left on device"), (errno.EIO, "input/output error")])
def test_failed_checkpoint_write_stops_cleanly_and_resumes(counting_data, tmp_path, capsys, monkeypatch, fail_writes,
                                                           err, cause):
    common = ["--data", counting_data, "--max-iters", 12, "--ckpt-interval", 4, "--eval-interval", 6, *TINY]
    assert run_main(["--out", tmp_path / "ref", *common], capsys)[0] == 0
    out = tmp_path / "run"
    real_save = lib.runs.save_checkpoints

    def save_then_break(run, trainer, progress, *, last, best):  # the checkpoints of step 8 fail 1,000 bytes in
        if progress.step == 8:
            fail_writes(err, after_bytes=1000, name_contains=".pt")
        real_save(run, trainer, progress, last=last, best=best)

    monkeypatch.setattr(lib.runs, "save_checkpoints", save_then_break)
    rc, _, stderr = run_main(["--out", out, *common], capsys)
    assert rc == 1
    assert stderr.splitlines() == [stderr.strip()]  # one line
    assert stderr.startswith(f"train.py: stopped: cannot write {out}/last.pt: {cause}")
    assert f"`python train.py --resume {out}` continues from step 4" in stderr
    assert debris(out) == []
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 4  # the previous one, intact
    monkeypatch.undo()  # the disk works again
    assert run_main(["--resume", out], capsys)[0] == 0
    assert losses(out) == losses(tmp_path / "ref")  # nothing lost: the same curve, bit for bit


def test_last_is_written_before_best_and_best_is_a_link_of_the_same_step(counting_data, tmp_path, capsys, monkeypatch):
    written = []
    real_write = lib.runs.write_checkpoint
    monkeypatch.setattr(lib.runs, "write_checkpoint", lambda name, *a, **k: (written.append(name), real_write(name, *a, **k)))
    out = tmp_path / "run"
    assert run_main(["--data", counting_data, "--out", out, "--max-iters", 9, "--ckpt-interval", 3, "--eval-interval", 2,
                     *TINY], capsys)[0] == 0
    # what must have been written, step by step: last.pt every 3 steps; best.pt at each evaluation that improved,
    # as its own write, or (at steps that also write last.pt) after it, as a link: never serialised twice
    vals = {r["step"]: r["val_loss"] for r in lib.runs.read_log(out / "log.jsonl") if "val_loss" in r and r["step"]}
    expected, best = [], float("inf")
    for step in range(1, 10):
        is_best = step in vals and vals[step] < best
        best = min(best, vals.get(step, best))
        if step % 3 == 0 or step == 9:
            expected.append("last.pt")
        elif is_best:
            expected.append("best.pt")
    assert written == expected and written[0] == "best.pt"  # step 2, the first evaluation, is always a best
    final_is_best = vals[9] == min(vals.values())
    assert (os.stat(out / "best.pt").st_ino == os.stat(out / "last.pt").st_ino) == final_is_best
    assert debris(out) == []


def test_best_and_last_of_one_step_are_one_file(counting_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(["--data", counting_data, "--out", out, "--max-iters", 4, "--eval-interval", 4, *TINY], capsys)[0] == 0
    assert os.stat(out / "best.pt").st_ino == os.stat(out / "last.pt").st_ino  # a hard link: no second write
    assert lib.checkpoints.read_checkpoint(out / "best.pt")["iteration"] == 4


def test_best_is_a_copy_where_hard_links_fail(counting_data, tmp_path, capsys, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = tmp_path / "run"
    assert run_main(["--data", counting_data, "--out", out, "--max-iters", 4, "--eval-interval", 4, *TINY], capsys)[0] == 0
    assert (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()
    assert os.stat(out / "best.pt").st_ino != os.stat(out / "last.pt").st_ino and debris(out) == []


def test_early_warning_when_the_next_checkpoint_will_not_fit(counting_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_usage = shutil.disk_usage
    state = {"free": None}

    def usage(path):  # after the first checkpoint, only 1 kB is left
        real = real_usage(path)
        return real if state["free"] is None else shutil._ntuple_diskusage(real.total, real.total - 1000, 1000)

    real_write = lib.runs.write_checkpoint

    def write_then_fill(name, *a, **k):
        real_write(name, *a, **k)
        state["free"] = 1000

    opened = []
    real_open = cli.open_for_write
    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(lib.runs, "write_checkpoint", write_then_fill)
    monkeypatch.setattr(cli, "open_for_write", lambda path: (opened.append(Path(path).name), real_open(path))[1])
    rc, _, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 8, "--ckpt-interval", 4,
                              "--eval-interval", 100, *TINY], capsys)
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 2, stderr
    assert lines[0] == (f"train.py: warning: the next checkpoint will not fit in {out} (no space left on device: "
                        f"{lines[0].split('device: ')[1].split(')')[0]}): free space now, or the run stops when it "
                        f"writes it")
    assert "1.00 kB free" in lines[0]
    assert lines[1].startswith(f"train.py: stopped: cannot write {out}/last.pt: no space left on device")
    assert "continues from step 4" in lines[1] and debris(out) == []
    assert opened.count("last.pt.tmp") == 1  # step 8's checkpoint was refused before a byte was written


def test_config_json_that_cannot_be_written_stops_before_training(counting_data, tmp_path, capsys, fail_writes):
    fail_writes(errno.EIO, after_bytes=10, name_contains="config.json")
    out = tmp_path / "run"
    rc, stdout, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 4, *TINY], capsys)
    assert rc == 1 and stderr.strip() == f"train.py: stopped: cannot write {out}/config.json: input/output error"
    assert not (out / "last.pt").exists() and debris(out) == [] and "step" not in stdout


# ---------------------------------------------------------------------------------------------------------------
# log.jsonl cannot be written
# ---------------------------------------------------------------------------------------------------------------


def test_a_failing_log_is_reported_once_and_training_goes_on(counting_data, tmp_path, capsys, fail_writes):
    fail_writes(errno.EIO, after_bytes=300, name_contains="log.jsonl")  # the first row or two, then EIO
    out = tmp_path / "run"
    rc, stdout, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 10, "--eval-interval", 5, *TINY],
                                  capsys)
    assert rc == 0
    assert stderr.count("train.py: warning: cannot write") == 1 and "input/output error" in stderr
    assert "training goes on" in stderr
    assert "step 10 |" in stdout  # the console still shows every row
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 10


def test_a_failing_log_stops_the_run_when_checkpoints_cannot_be_written_either(counting_data, tmp_path, capsys,
                                                                              fail_writes, monkeypatch):
    fail_writes(errno.ENOSPC, after_bytes=0, name_contains="log.jsonl")
    monkeypatch.setattr(lib.runs, "space_problem", lambda path, needed: "no space left on device: 1 MB needed, 0 B free")
    out = tmp_path / "run"
    rc, _, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 10, *TINY], capsys)
    assert rc == 1 and stderr.count("\n") == 1
    assert stderr.startswith(f"train.py: stopped: cannot write {out}/log.jsonl (no space left on device), and the "
                             f"next checkpoint will not fit either")
    assert "no checkpoint was written yet" in stderr


# ---------------------------------------------------------------------------------------------------------------
# a real small disk: a 20 MiB tmpfs and the demo-size model (~12.7 MB checkpoints)
# ---------------------------------------------------------------------------------------------------------------


def test_disk_full_on_a_real_tmpfs(counting_data, tmpfs, capsys):
    disk = tmpfs("20m")
    out = disk / "run"
    demo_size = ["--vocab-size", "1024", "--context-length", "128", "--d-model", "128", "--num-layers", "4",
                 "--num-heads", "4", "--d-ff", "344", "--batch-size", "2", "--peak-flops", "0", "--device", "cpu",
                 "--eval-iters", "1", "--log-interval", "1", "--warmup-iters", "1"]
    rc, _, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 4, "--ckpt-interval", 2,
                              "--eval-interval", 100, *demo_size], capsys)
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 2, stderr
    needed = r"no space left on device: 1[0-9]\.[0-9][0-9] MB needed, [0-9]\.[0-9][0-9] MB free"  # ~13 MB of ~21 MB
    assert re.match(rf"train.py: warning: the next checkpoint will not fit in {out} \({needed}\)", lines[0])
    assert re.match(rf"train.py: stopped: cannot write {out}/last.pt: {needed}; ", lines[1])
    assert "free; free space, then `python train.py --resume" in lines[1] and "continues from step 2" in lines[1]
    assert debris(out) == [] and not (out / "best.pt").exists()
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 2
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
    assert run_main(["--resume", out], capsys)[0] == 0
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 4 and debris(out) == []


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments
# ---------------------------------------------------------------------------------------------------------------


def start(counting_data, out, resume=False):
    flags = ["--resume", str(out)] if resume else [
        "--data", str(counting_data), "--out", str(out), "--max-iters", "80", "--ckpt-interval", "3", "--eval-interval",
        "20", *TINY]
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *flags], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_during_a_checkpoint_write(proc, out, timeout=30.0) -> bool:
    """SIGKILL proc the moment a checkpoint's temporary file exists; False if the run ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if any(out.glob("*.pt.tmp")):
            proc.kill()
            return True
    return False


@pytest.mark.slow  # seven training processes: ~1 minute on 2 idle cores
def test_five_sigkills_and_resumes_end_on_the_uninterrupted_curve(counting_data, tmp_path):
    ref = start(counting_data, tmp_path / "ref")
    assert ref.wait() == 0, ref.stderr.read()
    out, rng = tmp_path / "run", random.Random(0)
    proc, during_writes = start(counting_data, out), 0
    for kill in range(5):
        if kill % 2 == 0 and kill_during_a_checkpoint_write(proc, out):
            during_writes += 1
        else:
            time.sleep(rng.uniform(0.3, 2.0))  # somewhere in the loop: a step, an evaluation, start-up
            proc.kill()
        proc.wait()
        proc = start(counting_data, out, resume=(out / "last.pt").exists())
    assert proc.wait() == 0, proc.stderr.read()
    assert during_writes >= 2  # some kills really landed inside a checkpoint write
    assert losses(out) == losses(tmp_path / "ref") and debris(out) == []


def test_a_run_directory_that_cannot_be_made_is_one_line_exit_1(counting_data, tmp_path, capsys, monkeypatch):
    # (A file in the way of --out is misuse, exit 2: a row of tests/test_bad_input_train.py. Here the file system
    # refuses, as a read-only or foreign directory would; root ignores permission bits, so the refusal is injected.)
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "locked" / "run"
    rc, _, stderr = run_main(["--data", counting_data, "--out", out, "--max-iters", 2, *TINY], capsys)
    assert rc == 1 and stderr == f"train.py: stopped: cannot make the run directory {out}: permission denied; pick " \
                                 f"another --out\n"


def test_only_the_runs_own_partial_writes_are_removed(counting_data, tmp_path, capsys):
    # A user's files that merely end in .tmp survive a fresh run and a resume; last.pt.tmp, a checkpoint write that
    # a killed run left, is removed on resume.
    out = tmp_path / "run"
    out.mkdir()
    theirs = {"draft.tmp": "notes", "notes.pt.tmp": "mine", "last.pt.tmp.tmp": "also mine"}
    for name, text in theirs.items():
        (out / name).write_text(text)
    flags = ["--data", counting_data, "--out", out, "--max-iters", 4, "--ckpt-interval", 2, *TINY_RUN]
    assert run_main(flags, capsys)[0] == 0
    (out / "last.pt.tmp").write_bytes(b"half a checkpoint")
    rc, stdout, _ = run_main(["--resume", out, "--max-iters", 6], capsys)
    assert rc == 0 and f"removed {out / 'last.pt.tmp'}" in stdout
    assert debris(out) == sorted(theirs) and all((out / n).read_text() == t for n, t in theirs.items())
