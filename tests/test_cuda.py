"""CUDA-only checks (they skip without a GPU; `python bench/gpu_check.py` runs them on one): bf16 and fp16 training
steps (the GradScaler path), --compile, the fused SDPA kernel equal to the from-scratch attention, pinned
non_blocking batches, KV-cache sampling equal to the no-cache reference, and train.py under torchrun with one NCCL
rank for DDP and for FSDP.

    python -m pytest -m cuda            # these tests (on a machine with a CUDA GPU)
    python -m pytest -m slow            # the slow end-to-end checks of the whole suite
"""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from conftest import TINY_RUN, run_losses
from model import PRESETS, TransformerLM
from optim import cross_entropy

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parent.parent
SMALL = dataclasses.replace(PRESETS["tiny"], vocab_size=256, context_length=64, d_model=128, num_heads=4, d_ff=344)
TINY = [*TINY_RUN, "--device", "cuda"]


losses = run_losses


def run(*args, nproc=None, timeout=600):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                              str(29400 + os.getpid() % 500)] if nproc else []), str(ROOT / "train.py"),
           *map(str, args)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_training_runs_and_learns_in_each_precision(counting_data, tmp_path, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16")
    out = run("--data", counting_data, "--out", tmp_path / dtype, "--dtype", dtype, "--max-iters", 40, "--eval-interval",
              20, *TINY)
    assert f"precision: {dtype} (--dtype)" in out
    vals = [v for _, _, v in losses(tmp_path / dtype) if v is not None]
    assert vals[-1] < vals[0] - 0.5 and all(np.isfinite(vals))


def test_automatic_dtype_is_native_bf16_or_fp16(counting_data, tmp_path):
    out = run("--data", counting_data, "--out", tmp_path / "auto", "--max-iters", 2, *TINY)
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert f"precision: {expected} (automatic" in out


@pytest.mark.parametrize("flag", ["--compile", "--plain"])
def test_compiled_and_plain_runs_match_the_default_fast_path(flag, counting_data, tmp_path):
    common = ["--data", counting_data, "--dtype", "fp32", "--max-iters", 10, "--eval-interval", 5, *TINY]
    run("--out", tmp_path / "default", *common)
    run("--out", tmp_path / "variant", flag, *common)
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(tmp_path / "default"), losses(tmp_path / "variant")):
        for a, b in ((l1, l2), (v1, v2)):
            assert s1 == s2 and (a is None or abs(a - b) < 1e-3)  # TF32 matmuls and fused kernels: close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_sdpa_equals_the_manual_attention_on_gpu(dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, SMALL.vocab_size, (4, 64), device="cuda")
    outs = {}
    for impl in ("sdpa", "manual"):
        torch.manual_seed(0)
        # fast=True: attn_impl "sdpa" is then lib/kernels.py's fused kernel, "manual" the readable lines
        lm = TransformerLM(**dataclasses.asdict(dataclasses.replace(SMALL, attn_impl=impl)), device="cuda", fast=True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = cross_entropy(lm(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        outs[impl] = (loss.detach().float(), lm.layers[0].attn.q_proj.weight.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(outs["sdpa"][0], outs["manual"][0], rtol=tol, atol=tol)
    torch.testing.assert_close(outs["sdpa"][1], outs["manual"][1], rtol=tol * 10, atol=tol)


def test_batches_are_pinned_and_non_blocking():
    data = np.arange(10_000, dtype=np.uint16)
    x, y = train.get_batch(data, 4, 32, "cuda", torch.Generator().manual_seed(0))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.int64
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    x_cpu, _ = train.get_batch(data, 4, 32, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.cpu(), x_cpu)


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_kv_cache_sampling_on_gpu_equals_the_reference(fast):
    torch.manual_seed(0)
    lm = TransformerLM(**dataclasses.asdict(SMALL), device="cuda", fast=fast).eval()
    seq = torch.randint(0, SMALL.vocab_size, (2, 85), device="cuda")  # past the 64-token window
    cache = None
    with torch.inference_mode():
        for t in range(5, 85):  # the logits for the token after seq[:, :t], with the cache and without
            cached, cache = sample.next_logits(lm, seq[:, :t], cache if cache is not None else sample.KVCache())
            reference, _ = sample.next_logits(lm, seq[:, :t], None)
            torch.testing.assert_close(cached, reference, rtol=1e-3, atol=1e-3)
    ids = sample.generate(lm, seq[:, :5], 20, temperature=0.8, generator=torch.Generator("cuda").manual_seed(0))
    assert ids.shape == (2, 20) and ids.is_cuda


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_one_nccl_rank(counting_data, tmp_path, mode):
    flags = ["--fsdp"] if mode == "fsdp" else []
    out = run("--data", counting_data, "--out", tmp_path / mode, *flags, "--dtype", "fp32", "--max-iters", 10,
              "--eval-interval", 5, *TINY, nproc=1)
    assert "1 rank(s)" in out and ("FSDP" in out) == (mode == "fsdp")
    run("--data", counting_data, "--out", tmp_path / "plain", "--dtype", "fp32", "--max-iters", 10, "--eval-interval", 5,
        *TINY)
    for (s1, l1, v1), (s2, l2, v2) in zip(losses(tmp_path / "plain"), losses(tmp_path / mode)):
        for a, b in ((l1, l2), (v1, v2)):
            assert s1 == s2 and (a is None or abs(a - b) < 1e-3)
