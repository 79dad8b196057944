"""Scale and hardware on CPU: fp16 autocast with a GradScaler (the path for GPUs without native bf16), activation
checkpointing, the automatic dtype choice, and FSDP2 sharding with 2 gloo ranks (checkpoints interchangeable with a
single process, per-rank bytes halved, losses equal to one process).

    python -m pytest tests/test_scale.py            # the fast tests
    python -m pytest -m slow tests/test_scale.py    # the slow ones (more torchrun processes)
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import accounting
import train
import lib.checkpoints
import lib.runs
from conftest import TINY_RUN, run_losses
from model import PRESETS, ModelConfig, TransformerLM
from optim import cross_entropy

ROOT = Path(__file__).resolve().parent.parent
TINY = [*TINY_RUN, "--device", "cpu"]


def run_main(argv, capsys):
    rc = train.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def log(run_dir):
    return lib.runs.read_log(Path(run_dir) / "log.jsonl")


losses = run_losses


# ---------------------------------------------------------------------------------------------------------------
# fp16 + GradScaler
# ---------------------------------------------------------------------------------------------------------------


def test_fp16_loss_follows_fp32(counting_data, tmp_path, capsys):
    common = ["--data", counting_data, "--max-iters", 30, "--eval-interval", 10, *TINY]
    run_main(["--out", tmp_path / "fp32", "--dtype", "fp32", *common], capsys)
    out = run_main(["--out", tmp_path / "fp16", "--dtype", "fp16", *common], capsys)
    assert "precision: fp16 (--dtype)" in out
    fp32, fp16 = losses(tmp_path / "fp32"), losses(tmp_path / "fp16")
    assert [s for s, *_ in fp32] == [s for s, *_ in fp16]
    for (_, l32, v32), (_, l16, v16) in zip(fp32, fp16):
        for a, b in ((l32, l16), (v32, v16)):
            if a is not None:
                assert abs(a - b) < 0.05, (fp32, fp16)  # 16-bit matmuls, same algorithm: close, not equal
    assert fp16[-1][2] < fp16[0][2] - 0.5  # and it learns
    assert all(r.get("skipped_steps") == 0 for r in log(tmp_path / "fp16") if "loss" in r)  # none needed here
    ckpt = torch.load(tmp_path / "fp16" / "last.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] == train.FP16_INITIAL_SCALE  # no overflow, and fewer than 2,000 steps to grow


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(counting_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "FP16_INITIAL_SCALE", 2.0**40)  # x 1e12: the fp16 backward overflows at once
    out = run_main(["--data", counting_data, "--out", tmp_path / "run", "--dtype", "fp16", "--max-iters", 30,
                    "--eval-interval", 10, *TINY], capsys)
    rows = [r for r in log(tmp_path / "run") if "loss" in r]
    skipped = rows[-1]["skipped_steps"]
    scale = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["scaler"]["scale"]
    # each skipped step halved the scale (backoff 0.5); growth needs 2,000 clean steps, so none happened
    assert skipped >= 1 and scale == 2.0**40 / 2**skipped, (skipped, scale)
    assert f"{rows[0]['skipped_steps']} fp16 steps skipped" in out
    assert all(np.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]  # training went on


def test_fp16_resume_is_exact(counting_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "FP16_INITIAL_SCALE", 2.0**40)  # so the scaler's state (skips, scale) matters
    common = ["--data", counting_data, "--dtype", "fp16", "--max-iters", 20, "--ckpt-interval", 5, "--eval-interval", 8,
              *TINY]
    run_main(["--out", tmp_path / "ref", *common], capsys)
    real_clip, calls = train.clip_divisor, {"n": 0}

    def clip_then_sigterm(params, max_norm):
        calls["n"] += 1
        if calls["n"] == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_clip(params, max_norm)

    monkeypatch.setattr(train, "clip_divisor", clip_then_sigterm)
    assert "SIGTERM: saved" in run_main(["--out", tmp_path / "run", *common], capsys)
    monkeypatch.setattr(train, "clip_divisor", real_clip)
    run_main(["--resume", tmp_path / "run"], capsys)
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    skips = [r["skipped_steps"] for r in log(tmp_path / "run") if "loss" in r]
    assert skips == [r["skipped_steps"] for r in log(tmp_path / "ref") if "loss" in r] and skips[-1] >= 1


def test_automatic_dtype_choice():
    assert lib.checkpoints.pick_dtype(None, torch.device("cpu")) == ("fp32", lib.checkpoints.pick_dtype(None, torch.device("cpu"))[1])
    assert lib.checkpoints.pick_dtype("fp16", torch.device("cpu")) == ("fp16", "--dtype")
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert lib.checkpoints.pick_dtype(None, torch.device("cuda"))[0] == ("bf16" if native else "fp16")


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attn_impl):
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=64, context_length=32, d_model=64, num_heads=4, d_ff=96,
                              attn_impl=attn_impl)
    ids = torch.randint(0, 64, (3, 33), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        lm = TransformerLM(**dataclasses.asdict(cfg))
        lm.checkpoint_blocks = checkpointed
        loss = cross_entropy(lm(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in lm.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7)


def test_activation_checkpointing_keeps_only_block_inputs():
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=64, context_length=32, d_model=64, num_heads=4, d_ff=96)
    ids = torch.randint(0, 64, (2, 32))
    saved = []
    for checkpointed in (False, True):
        lm = TransformerLM(**dataclasses.asdict(cfg))
        lm.checkpoint_blocks = checkpointed
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            lm(ids).sum().backward()
        saved.append(sum(count))
    assert saved[1] < saved[0] / 2  # the blocks' insides are recomputed, not kept


def test_activation_checkpointing_run_matches_the_plain_run(counting_data, tmp_path, capsys):
    common = ["--data", counting_data, "--max-iters", 12, "--eval-interval", 6, *TINY]
    run_main(["--out", tmp_path / "plain", *common], capsys)
    run_main(["--out", tmp_path / "ac", "--activation-checkpointing", *common], capsys)
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(tmp_path / "plain"), losses(tmp_path / "ac")):
        assert s1 == s2
        for a, b in ((l1, l2), (v1, v2)):
            assert (a is None and b is None) or abs(a - b) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 with 2 gloo ranks on CPU
# ---------------------------------------------------------------------------------------------------------------


def torchrun(nproc: int, *args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + (os.getpid() + nproc) % 1000), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def python(*args):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_close_curves(a, b, tol=1e-5):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, l1, v1), (_, l2, v2) in zip(a, b):
        for x, y in ((l1, l2), (v1, v2)):
            assert (x is None) == (y is None) and (x is None or abs(x - y) < tol), (a, b)


TRAIN_PY = ROOT / "train.py"
FSDP_COMMON = ["--max-iters", "12", "--cosine-cycle-iters", "12", "--eval-interval", "6", "--ckpt-interval", "6",
               *TINY, "--log-interval", "1", "--grad-accum", "2"]


def test_fsdp_two_ranks_match_one_process_and_write_the_same_checkpoint(counting_data, tmp_path):
    python(TRAIN_PY, "--data", counting_data, "--out", tmp_path / "one", *FSDP_COMMON)
    out = torchrun(2, TRAIN_PY, "--data", counting_data, "--out", tmp_path / "fsdp", "--fsdp", *FSDP_COMMON).stdout
    assert "FSDP, 2 rank(s)" in out
    # same global batch, same update: only the order of float sums differs (as in the DDP test)
    assert_close_curves(losses(tmp_path / "one"), losses(tmp_path / "fsdp"))
    # last.pt is the file one process writes: same entries, keys, shapes and optimizer layout
    one, sharded = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("one", "fsdp"))
    assert sharded.keys() == one.keys() and sharded["model"].keys() == one["model"].keys()
    for k in one["model"]:
        torch.testing.assert_close(sharded["model"][k], one["model"][k], rtol=1e-4, atol=1e-6)
    assert sharded["optimizer"]["param_groups"] == one["optimizer"]["param_groups"]
    assert sharded["optimizer"]["state"].keys() == one["optimizer"]["state"].keys()
    for i, s in one["optimizer"]["state"].items():
        assert sharded["optimizer"]["state"][i]["step"] == s["step"]
        torch.testing.assert_close(sharded["optimizer"]["state"][i]["v"], s["v"], rtol=1e-3, atol=1e-9)


@pytest.mark.slow  # six more training processes
def test_fsdp_and_single_process_checkpoints_resume_each_other(counting_data, tmp_path):
    python(TRAIN_PY, "--data", counting_data, "--out", tmp_path / "ref", *FSDP_COMMON)
    # 6 steps one way, then the other 6 the other way (the cosine is fixed at 12 steps, so the curve is one curve)
    python(TRAIN_PY, "--data", counting_data, "--out", tmp_path / "a", *FSDP_COMMON, "--max-iters", 6)
    torchrun(2, TRAIN_PY, "--resume", tmp_path / "a", "--fsdp", "--max-iters", 12)
    torchrun(2, TRAIN_PY, "--data", counting_data, "--out", tmp_path / "b", "--fsdp", *FSDP_COMMON, "--max-iters", 6)
    python(TRAIN_PY, "--resume", tmp_path / "b", "--no-fsdp", "--max-iters", 12)
    for run in ("a", "b"):
        assert_close_curves(losses(tmp_path / run), losses(tmp_path / "ref"))
        assert max(s for s, *_ in losses(tmp_path / run)) == 12


@pytest.mark.slow
def test_fsdp_sigterm_then_resume_continues_the_curve(counting_data, tmp_path):
    python(TRAIN_PY, "--data", counting_data, "--out", tmp_path / "ref", *FSDP_COMMON, "--max-iters", 40,
           "--cosine-cycle-iters", 40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29700 + os.getpid() % 200), str(TRAIN_PY), "--data", str(counting_data), "--out", str(tmp_path / "run"),
           "--fsdp", *FSDP_COMMON, "--max-iters", "40", "--cosine-cycle-iters", "40"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not any(r["step"] >= 8 for r in log(tmp_path / "run")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks; they agree to stop at a log step
    stdout, stderr = proc.communicate(timeout=120)
    stopped = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["iteration"]
    assert "SIGTERM: saved" in stdout and 8 <= stopped < 40, stderr[-2000:]
    torchrun(2, TRAIN_PY, "--resume", tmp_path / "run")
    assert_close_curves(losses(tmp_path / "run"), losses(tmp_path / "ref"))


def test_fsdp_rank_holds_half_of_the_parameters_and_adamw_state(tmp_path):
    config = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)
    torchrun(2, ROOT / "tests" / "fsdp_bytes_worker.py", tmp_path, json.dumps(config))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = sum(p.numel() * 4 for p in TransformerLM(**config).parameters())  # fp32
    for rank, held in enumerate(ranks):
        assert held["params"] == held["grads"] == full // 2 and held["adamw_state"] == 2 * (full // 2)
        # and exactly what accounting.py predicts for this rank (in general ceil(dim0 / N) rows of each parameter)
        predicted = accounting.fsdp_shard_bytes(ModelConfig(**config), 2, rank=rank)
        assert (held["params"], held["grads"], held["adamw_state"]) == (
            predicted["params"], predicted["grads"], predicted["adamw_state"])


def test_fsdp_without_torchrun_is_one_line(counting_data, tmp_path, capsys):
    rc = train.main(["--data", str(counting_data), "--out", str(tmp_path / "r"), "--fsdp", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "torchrun --nproc_per_node N train.py ... --fsdp" in err


def test_a_torchrun_rank_ends_with_its_exit_code_and_all_its_output(counting_data, tmp_path):
    # Under torchrun (WORLD_SIZE set) train.py ends through os._exit, skipping the interpreter's teardown where gloo
    # can abort (lib.distributed.exit_skipping_teardown): the exit code and every line printed to a pipe must still come out.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "WORLD_SIZE": "1"}  # stdout buffered
    common = [sys.executable, TRAIN_PY, *TINY, "--max-iters", 4, "--eval-interval", 2, "--log-interval", 1]
    done = subprocess.run([*map(str, common), "--data", str(counting_data), "--out", str(tmp_path / "run")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("step 4 |"), done.stdout[-1000:]
    bad = subprocess.run([*map(str, common), "--data", str(tmp_path / "missing")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing" in bad.stderr, bad.stderr


@pytest.mark.slow  # torch.compile on CPU: ~30 s of compiling
def test_fsdp_with_activation_checkpointing_and_compile_matches_one_process(counting_data, tmp_path):
    python(TRAIN_PY, "--data", counting_data, "--out", tmp_path / "one", *FSDP_COMMON)
    torchrun(2, TRAIN_PY, "--data", counting_data, "--out", tmp_path / "fsdp", "--fsdp", "--activation-checkpointing",
             "--compile", *FSDP_COMMON, timeout=600)
    assert_close_curves(losses(tmp_path / "one"), losses(tmp_path / "fsdp"), tol=1e-4)
