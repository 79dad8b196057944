"""bench/gpu_check.py: one command that checks everything CUDA-specific, on one GPU, from the repository alone.

1. the CUDA-marked tests (tests/test_cuda.py: bf16, fp16 + GradScaler, --compile, fused SDPA == manual attention,
   pinned non_blocking batches, KV-cache sampling, DDP and FSDP under torchrun with one NCCL rank);
2. the handout's 17M model (ts17m) at batch 128 x context 256 in bf16 (fp16 where the GPU has no native bf16) with
   --compile, for a few hundred steps of train.py on random token ids: tokens/s, MFU against the published peak,
   and the peak memory next to accounting.py's prediction.
It prints a Markdown block for BENCHMARKS.md. No downloads: the ids are random (the speed does not depend on them).
About 5 minutes on one H100; `--steps` trades time for a steadier figure.

    python bench/gpu_check.py                 # the tests, then the throughput run
    python bench/gpu_check.py --skip-tests    # only the throughput run
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import accounting  # noqa: E402
from lib import measure  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.runs import read_log  # noqa: E402
from model import PRESETS  # noqa: E402

BATCH, CONTEXT = 128, 256


def run_cuda_tests() -> tuple[bool, str]:
    """pytest -m cuda; (passed, its summary line)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else done.stderr.strip()[-300:]
    if done.returncode != 0:
        print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    return done.returncode == 0, summary


def throughput(steps: int, work: Path) -> dict:
    """train.py on random ids: the last logged rows' median tokens/s and MFU, and the peak memory."""
    cfg = PRESETS["ts17m"]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=4_000_000, dtype=np.uint16)
    np.save(work / "train.npy", ids)
    np.save(work / "valid.npy", ids[:200_000])
    log_every = max(1, steps // 10)
    argv = ["--data", str(work), "--out", str(work / "run"), "--preset", "ts17m", "--batch-size", str(BATCH),
            "--context-length", str(CONTEXT), "--max-iters", str(steps), "--log-interval", str(log_every),
            "--eval-interval", str(steps), "--eval-iters", "2", "--ckpt-interval", str(10 * steps), "--compile",
            "--device", "cuda", "--warmup-iters", "10"]
    t0 = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu_check: the throughput run failed:\n{done.stderr[-3000:]}")
    rows = [r for r in read_log(work / "run" / "log.jsonl") if "tokens_per_s" in r]
    steady = rows[len(rows) // 2:]  # the first rows include compilation and warm-up
    dtype = json.loads((work / "run" / "config.json").read_text())["dtype"]
    return {"dtype": dtype, "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steady])),
            "mfu": float(np.median([r["mfu"] for r in steady])) if "mfu" in steady[0] else None,
            "max_memory_gb": max(r["max_memory_gb"] for r in rows), "seconds": time.time() - t0,
            "command": "python train.py " + " ".join(argv).replace(str(work), "WORK")}


def predicted_memory_gb(dtype: str) -> float:
    """accounting.py's per-GPU training memory for the same run (fused attention, autocast activations)."""
    cfg = PRESETS["ts17m"]
    return accounting.train_memory(cfg, BATCH, CONTEXT, activations="sdpa", dtype=dtype)["total"] / 1e9


def markdown(tests: tuple[bool, str], result: dict | None) -> str:
    name = torch.cuda.get_device_name()
    out = [f"### GPU check: {name}", "",
           f"Command: `python bench/gpu_check.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); "
           f"{measure.machine_line()}; CUDA {torch.version.cuda}", ""]
    if tests is not None:
        out += [f"- CUDA-marked tests (`pytest -m cuda`): {'passed' if tests[0] else 'FAILED'}: {tests[1]}"]
    if result is not None:
        mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no published peak)"
        predicted = predicted_memory_gb(result["dtype"])
        out += [f"- ts17m, batch {BATCH} x context {CONTEXT}, {result['dtype']} + compile, random ids "
                f"(`{result['command']}`):",
                "", "| tokens/s | MFU (published peak) | peak memory | accounting.py predicts |", "|---:|---:|---:|---:|",
                f"| {result['tokens_per_s']:,.0f} | {mfu} | {result['max_memory_gb']:.2f} GB | {predicted:.2f} GB |"]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = OneLineParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the throughput run (default 300)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(1, "bench/gpu_check.py: error: no CUDA GPU here; this check needs one\n")
    tests = None if args.skip_tests else run_cuda_tests()
    with tempfile.TemporaryDirectory() as work:
        result = None if args.skip_throughput else throughput(args.steps, Path(work))
    print(markdown(tests, result))
    return 0 if tests is None or tests[0] else 1


if __name__ == "__main__":
    sys.exit(main())
