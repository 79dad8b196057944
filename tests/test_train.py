"""Tests for train.py: get_batch (shapes, offsets, devices, id checks, DDP slices), checkpoints (round trip,
weights_only, no compile prefix, atomic under a crash, corrupt files, the pre-"progress" format), flag/config
resolution, a tiny run whose loss falls, exact resume after SIGKILL and after SIGTERM (bitwise identical losses on
CPU), a second signal stopping at once, the NaN stop, 2-process gloo DDP against one process, the shared
loss-over-windows evaluator, plots, the offline demo in its quick mode, --plain against the default path, and bad
input (one line, exit code 2, nothing lost). Through train.py's commands they also cover what it reaches in lib/:
runs.py (flags, --config, resume, Stop), checkpoints.py, evaluation.py, demo.py and cpu_tuning.py.

    python -m pytest tests/test_train.py            # the default (fast) tests
    python -m pytest -m slow tests/test_train.py    # the slow end-to-end checks (SIGKILL/SIGTERM resume)
"""
import dataclasses
import io
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

import train
import lib.demo
import lib.runs
from model import PRESETS, ModelConfig, TransformerLM
from optim import AdamW

ROOT = Path(__file__).resolve().parent.parent
# A model small enough that a step takes milliseconds; every run passes --peak-flops 0 (no MFU measurement).
TINY = ["--vocab-size", "32", "--context-length", "16", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--d-ff", "64", "--batch-size", "8", "--warmup-iters", "2", "--lr", "3e-3", "--min-lr", "3e-4",
        "--peak-flops", "0", "--device", "cpu"]


def write_ids(path, ids, dtype=np.uint16):
    np.save(path, np.asarray(ids, dtype=dtype))
    return path


@pytest.fixture
def data_dir(tmp_path):
    """train.npy / valid.npy of a learnable stream over 32 ids: counting up mod 32, with 10% random jumps."""
    rng = np.random.default_rng(0)

    def stream(n):
        ids = np.empty(n, dtype=np.int64)
        ids[0] = 0
        jumps = rng.random(n) < 0.1
        for i in range(1, n):
            ids[i] = rng.integers(32) if jumps[i] else (ids[i - 1] + 1) % 32
        return ids

    d = tmp_path / "data"
    d.mkdir()
    write_ids(d / "train.npy", stream(20_000))
    write_ids(d / "valid.npy", stream(2_000))
    return d


def run_main(argv, capsys):
    """train.main in-process -> (exit code, stdout, stderr); argparse's errors exit via SystemExit(2)."""
    try:
        rc = train.main(argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def losses(run_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in lib.runs.read_log(Path(run_dir) / "log.jsonl")]


# --------------------------------------------------------------------------------------------------------------
# get_batch
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_get_batch_shapes_shift_and_offsets(tmp_path, dtype):
    n, B, T = 100, 64, 8
    data = np.load(write_ids(tmp_path / "ids.npy", np.arange(n), dtype), mmap_mode="r")
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(20):
        x, y = train.get_batch(data, B, T, "cpu", g)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        # data is 0..n-1, so each row is arange(s, s+T) and y is x shifted by one token
        assert torch.equal(x - x[:, :1], torch.arange(T).expand(B, T))
        assert torch.equal(y, x + 1)
        starts += x[:, 0].tolist()
    assert min(starts) == 0 and max(starts) == n - T - 1  # every valid start, none past the end
    # the generator makes batches reproducible
    a = train.get_batch(data, B, T, "cpu", torch.Generator().manual_seed(3))
    b = train.get_batch(data, B, T, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])


def test_get_batch_ddp_slices_make_the_single_process_batch():
    data = np.arange(1000, dtype=np.uint16)
    whole, _ = train.get_batch(data, 8, 4, "cpu", torch.Generator().manual_seed(1))
    parts = [train.get_batch(data, 4, 4, "cpu", torch.Generator().manual_seed(1), rank=r, world_size=2)[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


@pytest.mark.parametrize("device", ["cuda", "cuda:99"])
def test_get_batch_unavailable_device_raises_a_runtime_error(device):
    # The handout's get_batch tests expect what torch raises here, a RuntimeError; ours says which device and what to do.
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    with pytest.raises(RuntimeError, match=rf"cannot put a batch on device {device} .*pick an available device"):
        train.get_batch(np.arange(100, dtype=np.uint16), 2, 4, device)
    with pytest.raises(RuntimeError):
        train.get_batch(np.arange(100, dtype=np.uint16), 2, 4, "nosuchdevice")


def test_get_batch_names_a_bad_id_and_its_file(tmp_path):
    ids = np.zeros(50, dtype=np.uint16)
    ids[30] = 999
    data = np.load(write_ids(tmp_path / "bad.npy", ids), mmap_mode="r")
    with pytest.raises(train.BadInputError, match=r"token id 999 at position 30 of .*bad\.npy is outside the model's vocabulary \[0, 100\)"):
        for _ in range(50):  # random windows: one of them soon covers position 30
            train.get_batch(data, 8, 10, "cpu", vocab_size=100)


def test_eval_starts_are_fixed_and_cover_small_splits():
    assert train.eval_starts(100, 10, 50).tolist() == list(range(0, 90, 10))  # all 9 whole windows
    torch.manual_seed(1)
    a = train.eval_starts(10_000, 10, 5)
    torch.manual_seed(2)
    assert np.array_equal(a, train.eval_starts(10_000, 10, 5)) and len(a) == 5


# --------------------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------------------


def small_model():
    cfg = ModelConfig(vocab_size=32, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    model = TransformerLM(**__import__("dataclasses").asdict(cfg))
    opt = AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(32, (2, 16))).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("to_file_object", [False, True])
def test_checkpoint_round_trip(tmp_path, to_file_object):
    model, opt = small_model()
    target = io.BytesIO() if to_file_object else tmp_path / "ck.pt"
    train.save_checkpoint(torch.compile(model), opt, 7, target, train_args={"lr": 1e-3}, tokenizer_dir="/tok")
    if to_file_object:
        target.seek(0)
    raw = torch.load(target, weights_only=True)  # plain tensors and values only
    if to_file_object:
        target.seek(0)
    assert not any(k.startswith("_orig_mod.") for k in raw["model"])  # the compile wrapper's prefix is gone
    assert raw["model_config"] == __import__("dataclasses").asdict(model.config)
    assert raw["train_args"] == {"lr": 1e-3} and raw["tokenizer_dir"] == "/tok" and raw["iteration"] == 7
    model2, opt2 = small_model()
    assert train.load_checkpoint(target, model2, opt2) == 7
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name]))


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    model, opt = small_model()
    path = tmp_path / "last.pt"
    train.save_checkpoint(model, opt, 1, path)
    before = path.read_bytes()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="simulated"):  # an error of the producer, not the file: unchanged
        train.save_checkpoint(model, opt, 2, path)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # and the torn temporary file is gone
    assert train.load_checkpoint(path, small_model()[0]) == 1


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(train.BadInputError, match="corrupt or not a train.py checkpoint"):
        train.load_checkpoint(bad, small_model()[0])


# --------------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------------


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": 0.5, "batch-size": 4, "preset": "tiny", "ffn": "silu", "d_model": 64}))
    args, ckpt = lib.runs.resolve_args(["--config", str(cfg), "--lr", "0.25", "--data", "x.npy"])
    assert ckpt is None and args["lr"] == 0.25 and args["batch_size"] == 4 and args["max_iters"] == 5000
    model_cfg = lib.runs.resolve_model_config(args, None, None)
    # the tiny preset, with d_model from the file and the SiLU FFN's d_ff = 4 * d_model
    assert (model_cfg.d_model, model_cfg.d_ff, model_cfg.num_layers, model_cfg.ffn) == (64, 256, 4, "silu")


def test_presets_and_ablation_flags_reach_model_config():
    # tiny, not ts17m: ModelConfig's defaults are ts17m, so an ignored --preset ts17m would go unnoticed
    args, _ = lib.runs.resolve_args(["--preset", "tiny", "--norm", "post", "--position", "nope", "--tie-embeddings",
                                  "--attn-impl", "manual"])
    cfg = lib.runs.resolve_model_config(args, None, None)
    assert cfg == ModelConfig(d_model=256, num_heads=8, d_ff=688, norm="post", position="nope", tie_embeddings=True,
                              attn_impl="manual")
    assert cfg == dataclasses.replace(PRESETS["tiny"], norm="post", position="nope", tie_embeddings=True,
                                      attn_impl="manual")


# --------------------------------------------------------------------------------------------------------------
# training runs (in-process)
# --------------------------------------------------------------------------------------------------------------


def test_tiny_run_loss_falls_and_writes_the_run_directory(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run_main(["--data", str(data_dir), "--out", str(out), "--max-iters", "30", "--eval-interval",
                              "15", "--log-interval", "5", "--eval-iters", "4", *TINY], capsys)
    assert rc == 0, stdout
    rows = lib.runs.read_log(out / "log.jsonl")
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in vals] == [0, 15, 30]  # step 0, every --eval-interval, the end
    assert abs(vals[0][1] - np.log(32)) < 0.5  # untrained: about ln V
    assert vals[-1][1] < vals[0][1] - 1.0  # the counting pattern is learnable: the loss falls a lot
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for key in ("lr", "tokens", "time", "grad_norm", "ms_per_step", "tokens_per_s"):
        assert key in train_rows[0]
    assert train_rows[-1]["tokens"] == 30 * 8 * 16
    for name in ("last.pt", "best.pt", "config.json"):
        assert (out / name).is_file()
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 30 and ckpt["model_config"]["d_model"] == 32
    assert json.loads((out / "config.json").read_text())["max_iters"] == 30
    # the resolved config.json is itself a --config file that repeats the run
    again, _ = lib.runs.resolve_args(["--config", str(out / "config.json"), "--out", str(tmp_path / "again")])
    assert lib.runs.resolve_model_config(again, None, None) == ModelConfig(**ckpt["model_config"])
    assert again["max_iters"] == 30 and again["data"] == str(data_dir)


def test_plain_trains_with_the_chapters_code_to_nearly_the_same_losses(data_dir, tmp_path, capsys, monkeypatch):
    """--plain: model.py's own lines, optim.py's AdamW loop, readable cross-entropy and clip_grad_norm; no fused
    kernel anywhere. The two paths compute the same function, so the loss curves agree up to rounding."""
    seen = {}
    real_build, real_ce = train.build_trainer, train.cross_entropy

    def build_and_record(run, *a, **k):
        trainer, progress = real_build(run, *a, **k)
        seen.setdefault(run.args["plain"], {}).update(
            model_fast={getattr(m, "fast", False) for m in trainer.model.modules()} - {False},
            optimizer={(g["fused"], g["foreach"]) for g in trainer.optimizer.param_groups})
        return trainer, progress

    def ce_recording(logits, targets, fast=False):
        seen.setdefault("ce_fast", set()).add(fast)
        return real_ce(logits, targets, fast=fast)

    def no_clip_divisor(*a, **k):
        raise AssertionError("--plain must clip with optim.clip_grad_norm, not the fused step's divisor")

    monkeypatch.setattr(train, "build_trainer", build_and_record)
    monkeypatch.setattr(train, "cross_entropy", ce_recording)
    common = ["--data", str(data_dir), "--max-iters", "12", "--eval-interval", "6", "--log-interval", "3",
              "--eval-iters", "2", *TINY]
    assert run_main([*common, "--out", str(tmp_path / "fast")], capsys)[0] == 0
    assert seen[False] == {"model_fast": {True}, "optimizer": {(True, False)}} and seen.pop("ce_fast") == {True}
    monkeypatch.setattr(train, "clip_divisor", no_clip_divisor)
    assert run_main([*common, "--out", str(tmp_path / "plain"), "--plain"], capsys)[0] == 0
    assert seen[True] == {"model_fast": set(), "optimizer": {(False, False)}} and seen["ce_fast"] == {False}
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["plain"] is True
    fast, plain = losses(tmp_path / "fast"), losses(tmp_path / "plain")
    assert [r[0] for r in fast] == [r[0] for r in plain]
    for (_, a, va), (_, b, vb) in zip(fast, plain):  # fp32, 12 steps: rounding differences only (~1e-7 seen)
        assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-4)
        assert (va is None) == (vb is None) and (va is None or abs(va - vb) < 1e-4)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_ce = train.cross_entropy

    def ce_that_breaks(logits, targets, fast=False):  # finite for the first 12 training steps, then nan
        calls["n"] += 1  # (evaluation scores with lib/evaluation.py's own cross_entropy: only training steps count)
        loss = real_ce(logits, targets, fast=fast)
        return loss * float("nan") if calls["n"] > 12 else loss

    monkeypatch.setattr(train, "cross_entropy", ce_that_breaks)
    out = tmp_path / "run"
    rc, _, err = run_main(["--data", str(data_dir), "--out", str(out), "--max-iters", "40", "--eval-iters", "1",
                           "--eval-interval", "100", "--ckpt-interval", "5", "--log-interval", "4", *TINY], capsys)
    assert rc == 1
    assert "nan/inf by step 15" in err and "try --lr" in err and "step 10" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_plot_draws_curves(data_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert run_main(["--data", str(data_dir), "--out", str(out), "--max-iters", "4", "--eval-interval", "2",
                     "--log-interval", "1", "--eval-iters", "1", *TINY], capsys)[0] == 0
    png = tmp_path / "curves.png"
    assert run_main(["plot", str(out), str(out), "-o", str(png)], capsys)[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = run_main(["plot", str(tmp_path), "-o", str(tmp_path / "c.png")], capsys)
    assert rc == 2 and "pip install matplotlib" in err


def test_no_arguments_runs_the_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr(lib.demo, "demo", lambda out, quick=False, plain=False: seen.update(out=out, quick=quick))
    assert train.main([]) == 0
    assert seen == {"out": Path("runs/demo"), "quick": False}


def to_legacy_checkpoint(path):
    """Rewrite a checkpoint in the format written before the "progress" entry (three entries instead of one)."""
    ckpt = torch.load(path, weights_only=True)
    p = ckpt.pop("progress")
    ckpt.update(best_val_loss=p["best_val_loss"], elapsed=p["elapsed"],
                pending_loss=(p["loss_sum"], p["last_log_step"]))
    torch.save(ckpt, path)


@pytest.mark.parametrize("checkpoint_format", ["progress", "legacy"])
def test_sigterm_then_resume_matches_an_uninterrupted_run_exactly(data_dir, tmp_path, capsys, monkeypatch,
                                                                    checkpoint_format):
    # Log every 4 steps and stop at 13: the resumed run must also carry the loss summed over step 13 into its
    # step-16 log line, and cut nothing it needs from log.jsonl. "legacy": the checkpoint is rewritten in the older
    # format before resuming, which must give the same curve (old checkpoints still resume exactly).
    common = ["--data", str(data_dir), "--max-iters", "24", "--eval-interval", "8", "--log-interval", "4",
              "--ckpt-interval", "5", "--eval-iters", "2", *TINY]
    assert run_main(["--out", str(tmp_path / "ref"), *common], capsys)[0] == 0
    calls = {"n": 0}
    real_clip = train.clip_divisor

    def clip_then_sigterm(params, max_norm):  # called once per optimizer step
        calls["n"] += 1
        if calls["n"] == 13:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to train.py's handler, as `kill PID` would be
        return real_clip(params, max_norm)

    monkeypatch.setattr(train, "clip_divisor", clip_then_sigterm)
    out = tmp_path / "stopped"
    rc, stdout, _ = run_main(["--out", str(out), *common], capsys)
    assert rc == 0 and f"SIGTERM: saved {out}/last.pt at step 13" in stdout
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.setattr(train, "clip_divisor", real_clip)
    if checkpoint_format == "legacy":
        to_legacy_checkpoint(out / "last.pt")
    assert run_main(["--resume", str(out)], capsys)[0] == 0
    assert losses(out) == losses(tmp_path / "ref")  # exact floats, train and val
    assert max(s for s, *_ in losses(out)) == 24


def test_a_second_signal_stops_at_once_without_saving(data_dir, tmp_path, capsys, monkeypatch):
    real_clip = train.clip_divisor
    calls = {"n": 0}

    def clip_then_two_signals(params, max_norm):
        calls["n"] += 1
        if calls["n"] == 7:
            # raise_signal, not os.kill: it signals this thread, so each handler runs before the call returns. (A
            # signal sent to the process may land on another thread; if the first's handler had not run when the
            # second came, Python would run them in signal-number order, SIGINT first, and the roles would swap.)
            signal.raise_signal(signal.SIGTERM)  # the first: finish the step, save, exit
            signal.raise_signal(signal.SIGINT)   # the second, before the step is over: stop now
            raise AssertionError("the second signal did not interrupt the step")
        return real_clip(params, max_norm)

    monkeypatch.setattr(train, "clip_divisor", clip_then_two_signals)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a background job (`cmd &`)
    out = tmp_path / "run"
    rc, stdout, err = run_main(["--data", str(data_dir), "--out", str(out), "--max-iters", "20", "--ckpt-interval",
                                "5", "--eval-iters", "1", *TINY], capsys)
    assert rc == 128 + signal.SIGINT, err
    assert err.startswith("train.py: stopped: second SIGINT (SIGTERM first): stopped at once") and err.count("\n") == 1
    assert f"--resume {out}" in err and "saved" not in stdout
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 5  # the periodic one, untouched
    assert not list(out.glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) == before  # the handlers are put back


def test_train_leaves_its_args_unchanged(data_dir, tmp_path, capsys):
    args, _ = lib.runs.resolve_args(["--data", str(data_dir), "--out", str(tmp_path / "run"), "--max-iters", "2",
                                  "--eval-iters", "1", *TINY])
    before = dict(args)
    train.train(args)
    assert args == before


FLUSH_CHECK = """
import numpy as np, sys, torch
sys.path.insert(0, {root!r})
from lib import cpu_tuning
x = torch.from_numpy(np.full(1 << 20, 1e-39, dtype=np.float32))  # subnormal, made before any flushing
if {first}:
    assert cpu_tuning.flush_subnormals()
_ = x * 1.0  # the first parallel op: torch's thread pool starts here
if not {first}:
    torch.set_flush_denormal(True)
print(int(((x * 1.0).view(torch.int32) != 0).sum()))  # results left subnormal (bit patterns: DAZ reads them as 0)
"""


@pytest.mark.parametrize("first", [True, False], ids=["first", "after the thread pool started"])
def test_flush_subnormals_reaches_every_thread_only_when_called_first(first):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals (no SSE3)")
    done = subprocess.run([sys.executable, "-c", FLUSH_CHECK.format(root=str(ROOT), first=first)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True)
    unflushed = int(done.stdout)
    if first:
        assert unflushed == 0  # why train.py calls it before anything else
    else:
        assert 0 < unflushed < 1 << 20  # the main thread's share is flushed, the pool thread's is not


KEEP_CHECK = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import train  # the process python train.py is: its imports first, as before
from lib import cpu_tuning
if {keep}:
    assert cpu_tuning.keep_freed_memory()
def page_faults_of_a_fresh_100_mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(25 << 20)  # 100 MiB, every page written
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults = [page_faults_of_a_fresh_100_mib_tensor() for _ in range(12)]  # the first few grow the heap
print(faults[0], min(faults[6:]), max(faults[6:]))
"""


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "glibc's default"])
def test_keep_freed_memory_lets_the_next_allocation_reuse_the_pages(keep):
    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("keep_freed_memory tunes glibc's malloc (Linux only)")
    done = subprocess.run([sys.executable, "-c", KEEP_CHECK.format(root=str(ROOT), keep=keep)], capture_output=True,
                          text=True, check=True)
    # page faults of the first allocation (all of its pages: 25,600 of 4 KiB, fewer with huge pages) and the
    # fewest and most of the last 6
    first, fewest, most = map(int, done.stdout.split())
    if keep:
        assert first > 0 and most <= first // 100  # the freed 100 MiB stayed in the heap: nothing faulted again
    else:
        assert fewest >= first // 2  # mmap'ed afresh every time: all of its pages faulted in again


def test_validation_and_sample_eval_share_one_evaluator(data_dir):
    import sample
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=32, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64).eval()
    data = np.load(data_dir / "valid.npy", mmap_mode="r")[:16 * 20 + 1]   # exactly 20 windows of 16 targets
    starts = train.eval_starts(len(data), 16, 1000)
    val = train.evaluate(model, data, starts, 8, 16, torch.device("cpu"), torch.autocast("cpu", enabled=False), 32)
    loss, n = sample.evaluate(model, data)
    ids = torch.from_numpy(data.astype(np.int64))
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(model(ids[:-1].view(20, 16)).flatten(0, 1), ids[1:])
    assert n == 320 and val == pytest.approx(loss, rel=1e-6) and val == pytest.approx(reference.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# exact resume after SIGKILL / SIGTERM (subprocesses)
# --------------------------------------------------------------------------------------------------------------


def start_run(data_dir, out, extra=()):
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data_dir), "--out", str(out), "--max-iters", "60",
           "--eval-interval", "20", "--eval-iters", "2", "--log-interval", "1", "--ckpt-interval", "7", *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, log, step):
    while proc.poll() is None:
        rows = lib.runs.read_log(log) if log.is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.005)
    raise AssertionError(f"run ended before step {step}: {proc.communicate()}")


def resume(out):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow  # five training processes: ~30 s on 2 idle cores
def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(data_dir, tmp_path):
    ref = start_run(data_dir, tmp_path / "ref")
    killed, stopped = start_run(data_dir, tmp_path / "killed"), None
    wait_for_step(killed, tmp_path / "killed" / "log.jsonl", 16)
    killed.send_signal(signal.SIGKILL)  # no chance to save: resume must use the last periodic checkpoint
    killed.wait()
    stopped = start_run(data_dir, tmp_path / "stopped")
    wait_for_step(stopped, tmp_path / "stopped" / "log.jsonl", 24)
    stopped.send_signal(signal.SIGTERM)  # saves at the end of the current step and exits cleanly
    out, err = stopped.communicate()
    assert stopped.returncode == 0, err
    assert "SIGTERM: saved" in out
    stop_step = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["iteration"]
    assert 24 <= stop_step < 60
    assert ref.wait() == 0, ref.stderr.read()
    killed_at = max(r["step"] for r in lib.runs.read_log(tmp_path / "killed" / "log.jsonl"))
    assert killed_at < 60  # it really was killed mid-run
    for run in ("killed", "stopped"):
        done = resume(tmp_path / run)
        assert done.returncode == 0, done.stderr
        assert losses(tmp_path / run) == losses(tmp_path / "ref")  # exact floats, every step, train and val


@pytest.mark.slow  # a ts17m-sized model on CPU: a step takes seconds, so "at once" is measurable
def test_two_sigterms_stop_a_real_run_within_a_second_or_two(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data_dir), "--out", str(out), "--preset", "ts17m",
           "--vocab-size", "32", "--batch-size", "32", "--max-iters", "100", "--log-interval", "1", "--eval-iters",
           "1", "--peak-flops", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out / "log.jsonl", 1)
    step_seconds = lib.runs.read_log(out / "log.jsonl")[-1]["ms_per_step"] / 1000
    proc.send_signal(signal.SIGTERM)  # step 2 has just begun: it would finish, save and exit...
    time.sleep(min(0.5, step_seconds / 4))
    proc.send_signal(signal.SIGTERM)  # ...but the second signal stops it now
    t = time.perf_counter()
    stdout, stderr = proc.communicate(timeout=60)
    waited = time.perf_counter() - t
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == [stderr.strip()] and "second SIGTERM (SIGTERM first): stopped at once" in stderr
    assert "saved" not in stdout and not (out / "last.pt").exists() and not list(out.glob("*.tmp"))
    assert waited < min(2.0, step_seconds / 2), (waited, step_seconds)


# --------------------------------------------------------------------------------------------------------------
# DDP: 2 gloo processes against one process with the same global batch
# --------------------------------------------------------------------------------------------------------------


def test_ddp_two_gloo_ranks_match_one_process(data_dir, tmp_path):
    # --grad-accum 2: each rank runs 2 micro-batches of 2 sequences, all-reducing only after the second (no_sync)
    common = ["--data", str(data_dir), "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2",
              "--log-interval", "1", *TINY, "--grad-accum", "2"]
    single = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "one"), *common],
                            cwd=ROOT, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29500 + os.getpid() % 1000), str(ROOT / "train.py"), "--out", str(tmp_path / "two"),
                          *common], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, *_ in one] == [s for s, *_ in two]
    # Same batches, same update: only float summation order differs (per-rank means averaged by all-reduce).
    for (_, l1, v1), (_, l2, v2) in zip(one, two):
        for a, b in ((l1, l2), (v1, v2)):
            assert (a is None) == (b is None)
            if a is not None:
                assert abs(a - b) < 1e-5, (one, two)  # seen: 5e-7 after 12 steps


# --------------------------------------------------------------------------------------------------------------
# the offline demo (quick mode)
# --------------------------------------------------------------------------------------------------------------


def test_demo_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "demo", "--quick", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("data/vocab.json", "data/merges.txt", "data/train.npy", "data/valid.npy", "run/last.pt",
                 "run/log.jsonl"):
        assert (out / path).is_file(), path
    assert "[5/5] sample" in done.stdout and "python sample.py" in done.stdout
    ckpt = torch.load(out / "run" / "last.pt", weights_only=True)
    assert Path(ckpt["tokenizer_dir"]) == (out / "data").resolve()
    # the printed sample is what the checkpoint generates with the demo's settings, and it is not empty
    import sample
    model, tok, _ = sample.load_model(out / "run" / "last.pt")
    ids = sample.generate(model, tok.encode("The "), lib.demo.DEMO["quick"]["new_tokens"], temperature=0.8, top_p=0.95,
                          eos_id=tok.special_token_ids["<|endoftext|>"], generator=torch.Generator().manual_seed(0))
    text = tok.decode(ids.tolist())
    assert len(ids) > 0 and text.strip() and f"\n\nThe {text}\n" in done.stdout


# --------------------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing lost
# --------------------------------------------------------------------------------------------------------------


def one_line_error(rc, err, pattern):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("make, flags, pattern", [
    (None, [], "does not exist"),
    (lambda p: np.save(p, np.zeros(100, dtype=np.float32)), [], "expected 1-D uint16 or uint32"),
    (lambda p: np.save(p, np.zeros(100, dtype=np.int64)), [], "expected 1-D uint16 or uint32"),
    (lambda p: np.save(p, np.zeros(10, dtype=np.uint16)), [], "fewer than context_length + 1 = 17"),
    (lambda p: np.save(p, np.full(1000, 40, dtype=np.uint16)), [], "token id 40 at position"),
    (lambda p: p.write_bytes(b"garbage"), [], "not a readable .npy"),
])
def test_bad_data(tmp_path, capsys, make, flags, pattern):
    path = tmp_path / "ids.npy"
    if make:
        make(path)
    rc, _, err = run_main(["--data", str(path), "--out", str(tmp_path / "run"), "--max-iters", "2", *TINY, *flags],
                          capsys)
    one_line_error(rc, err, pattern)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("flags, pattern", [
    (["--num-heads", "3"], "num_heads"),  # d_model 32 not divisible by 3: ModelConfig.validate's line
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible by --grad-accum 4"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--norm", "middle"], "invalid choice"),
    (["--warmup-iters", "50", "--max-iters", "10"], "--warmup-iters 50"),
    (["--max-iters", "many"], "invalid int value"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
])
def test_inconsistent_flags(data_dir, tmp_path, capsys, flags, pattern):
    rc, _, err = run_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, *flags], capsys)
    one_line_error(rc, err, pattern)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda(data_dir, tmp_path, capsys):
    rc, _, err = run_main(["--data", str(data_dir), "--out", str(tmp_path / "r"), *TINY, "--device", "cuda"], capsys)
    one_line_error(rc, err, "CUDA is not available")


def test_bad_resumes_and_existing_runs_lose_nothing(data_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*run_main(["--resume", str(empty)], capsys)[::2], "no checkpoint")
    run = tmp_path / "run"
    assert run_main(["--data", str(data_dir), "--out", str(run), "--max-iters", "3", "--eval-iters", "1", *TINY],
                    capsys)[0] == 0
    saved = (run / "last.pt").read_bytes()
    # a different model config
    one_line_error(*run_main(["--resume", str(run), "--d-model", "64"], capsys)[::2], "different model config")
    # starting afresh over an existing run needs --overwrite
    one_line_error(*run_main(["--data", str(data_dir), "--out", str(run), *TINY], capsys)[::2],
                   f"--resume {run}")
    assert (run / "last.pt").read_bytes() == saved
    # a corrupt checkpoint
    (run / "last.pt").write_bytes(saved[: len(saved) // 2])
    one_line_error(*run_main(["--resume", str(run)], capsys)[::2], "corrupt or not a train.py checkpoint")


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 1}))
    one_line_error(*run_main(["--config", str(cfg)], capsys)[::2], "unknown key 'learning_rate'")
    cfg.write_text("{not json")
    one_line_error(*run_main(["--config", str(cfg)], capsys)[::2], "not valid JSON")
    cfg.write_text(json.dumps({"max_iters": "ten"}))
    one_line_error(*run_main(["--config", str(cfg)], capsys)[::2], "max_iters must be an integer")
    cfg.write_text(json.dumps({"dtype": "fp8"}))
    one_line_error(*run_main(["--config", str(cfg)], capsys)[::2], "dtype must be one of bf16, fp16, fp32")


@pytest.mark.parametrize("values, words", [
    ({"tie_embeddings": "false"}, "tie_embeddings must be JSON true or false, got 'false'"),
    ({"activation_checkpointing": "false"}, "activation_checkpointing must be JSON true or false"),
    ({"fsdp": "no"}, "fsdp must be JSON true or false, got 'no'"),
    ({"compile": 1}, "compile must be JSON true or false, got 1"),
    ({"wandb": 5}, "wandb must be a string, got 5"),
    ({"data": 5}, "data must be a string, got 5"),
    ({"lr": True}, "lr must be a number"),
])
def test_config_values_are_typed_like_the_command_line(values, words, counting_data, tmp_path, capsys):
    # A string "false" is truthy: taken as a switch it would silently turn the feature on. Nothing is written.
    cfg, out = tmp_path / "c.json", tmp_path / "run"
    cfg.write_text(json.dumps({"data": str(counting_data), "out": str(out), "max_iters": 2, **values}))
    one_line_error(*run_main(["--config", str(cfg)], capsys)[::2], words)
    assert not out.exists()


def test_config_switches_take_json_booleans(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"tie_embeddings": False, "activation_checkpointing": True}))
    args, _ = lib.runs.resolve_args(["--config", str(cfg)])
    assert args["tie_embeddings"] is False and args["activation_checkpointing"] is True


def test_missing_data_from_the_command_line_exits_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path / "nope.npy")],
                          cwd=tmp_path, capture_output=True, text=True)
    one_line_error(done.returncode, done.stderr, "does not exist")
    assert not (tmp_path / "runs").exists()  # no run directory was made for a run that never started
