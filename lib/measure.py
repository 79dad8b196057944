"""measure.py: the measurements that check accounting.py's formulas, and the machine a benchmark ran on.

Serves accounting.py (its --measure report) and its tests, train.py (a CPU run's MFU denominator), bench/ and
experiments/ (the machine line of every report). Upper floor: it imports the chapters model, optim and accounting.
  - measure_saved_activations: run model.TransformerLM (its fast path, what train.py runs) + optim.cross_entropy
    forward on CPU and add up the bytes autograd saves for backward, the ground truth for accounting's activation
    rows (tests/test_accounting.py holds them equal);
  - measure_report(_16bit): `python accounting.py --preset tiny --measure`, formula beside measured bytes;
  - measure_matmul_flops: a measured torch.mm peak, the MFU denominator where no datasheet applies;
  - machine_line: one line naming the CPU, cores, torch and Python a measurement ran on.
"""
import dataclasses
import math
import os
import platform
import time

import torch

import model
import optim
from accounting import (ACTIVATION_BYTES, COMPUTE_DTYPES, FP32_BYTES, activation_elements, activation_rows,
                        autocast_weight_bytes, block_matmul_params, recomputation_rows, table, times)
from lib.cli import human_bytes


# ---------------------------------------------------------------------------------------------------------------
# Hardware: what this machine is, and its measured torch.mm peak (the MFU denominator where no datasheet applies)
# ---------------------------------------------------------------------------------------------------------------

def machine_line() -> str:
    """One line naming what a measurement ran on, for benchmark and experiment reports, e.g.
    'Intel(R) Xeon(R) CPU @ 2.20GHz, 2 cores, torch 2.5.1 (2 threads), Python 3.12.3'."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty or just the architecture
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


MIN_TIMED_S = 1e-3  # a timing shorter than this is mostly clock and loop overhead: time more calls at once


def measure_matmul_flops(device="cpu", dtype=torch.float32, n: int | None = None, seconds: float = 1.0) -> float:
    """FLOP/s of an n x n torch.mm (2·n³ FLOPs each), the best of repeated timings over about `seconds`.

    The best, not the median: noise from other processes only ever slows a run down, so the fastest repeat is the
    closest estimate of what the hardware can do — a peak, to divide achieved FLOP/s by."""
    device = torch.device(device)
    if n is None:  # big enough to be compute-bound, small enough for ~10+ repeats in a second on 2 CPU cores
        n = 4096 if device.type == "cuda" else 1024
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel selection, thread pool start, lazy CUDA init
    sync()
    reps = 1  # calls per timing; grown until one timing is long enough for the clock to resolve it
    best = math.inf
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()  # subtle: CUDA launches are asynchronous; without this we would time the launches
        dt = (time.perf_counter() - t0) / reps
        best = min(best, dt)
        if dt * reps < MIN_TIMED_S:
            reps *= 2
        if time.perf_counter() > deadline:
            return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------------------------
# Measured: the bytes autograd really keeps for backward (--measure), to check accounting.activation_rows against
# ---------------------------------------------------------------------------------------------------------------

def measure_saved_activations(cfg, batch_size: int = 1, seq_len: int | None = None, seed: int = 0,
                              checkpointing: bool = False, dtype: str = "fp32") -> dict:
    """Run model.TransformerLM + optim.cross_entropy forward on CPU, both on their fast path (fast=True: what
    train.py runs, and what accounting.saved_activations' rows describe), and add up the tensors autograd saves.

    torch.autograd.graph.saved_tensors_hooks calls `pack` on every tensor an op stores for its backward. Many of
    them share memory (q, k, v as views of one matmul output; x saved by both w1 and w3), so we count each
    storage once. Parameters and buffers are excluded (they are counted as parameters, not activations).
    With checkpointing (model.py's lm.checkpoint_blocks, what train.py's --activation-checkpointing sets) the hooks
    see what the checkpoints keep: each block's input (and the token positions), not the tensors inside the blocks,
    which checkpoint's own inner hooks take and drop.
    A 16-bit dtype runs the forward under CPU torch.autocast, as train.py does on one device.
    Returns bytes: "float" (every floating-point tensor saved), "weight_copies" (those of "float" that are a
    parameter cast to the autocast dtype, autocast_weight_bytes; 0 in fp32) and "other" (int64 token
    ids/targets/positions, bool masks)."""
    B, T = batch_size, cfg.context_length if seq_len is None else seq_len
    torch.manual_seed(seed)
    lm = model.TransformerLM(**dataclasses.asdict(cfg), fast=True)
    persistent = {t.untyped_storage().data_ptr() for t in [*lm.parameters(), *lm.buffers()]}
    ids = torch.randint(cfg.vocab_size, (B, T + 1))
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T) inputs and next-token targets
    seen: dict[int, tuple[int, str]] = {}  # storage address -> (bytes, "float" | "weight_copies" | "other")

    def is_weight_copy(t: torch.Tensor) -> bool:  # a parameter cast to t's dtype, or its transpose (Linear's W.T)
        return any(w.shape == t.shape and torch.equal(w.to(t.dtype), t)
                   for p in lm.parameters() for w in (p.detach(), p.detach().mT if p.dim() == 2 else p.detach()))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in persistent:
            # note: returning t keeps it alive until backward, so no address is freed and reused meanwhile
            floating = t.dtype.is_floating_point or t.dtype.is_complex
            kind = "other" if not floating else "weight_copies" if is_weight_copy(t) else "float"
            seen[storage.data_ptr()] = (storage.nbytes(), kind)
        return t

    compute = COMPUTE_DTYPES[dtype]
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=compute, enabled=compute != torch.float32)):
        lm.checkpoint_blocks = checkpointing
        loss = optim.cross_entropy(lm(x), y, fast=True)
    loss.backward()  # the saved tensors are really used: this fails if anything above broke the graph
    total = {kind: sum(n for n, k in seen.values() if k == kind) for kind in ("float", "weight_copies", "other")}
    return {**total, "float": total["float"] + total["weight_copies"]}


# ---------------------------------------------------------------------------------------------------------------
# The --measure report: formula beside measured bytes
# ---------------------------------------------------------------------------------------------------------------

def measure_report(cfg, batch_size: int, seq_len: int, checkpointing: bool = False, dtype: str = "fp32") -> str:
    """--measure: the handout's activation formula, this implementation's, and the bytes autograd really saved,
    for the from-scratch attention and the fused one; with checkpointing, of the checkpointed model, and one
    block's recomputed activations as the difference of the two runs. A 16-bit dtype runs under CPU autocast."""
    if COMPUTE_DTYPES[dtype] != torch.float32:
        return measure_report_16bit(cfg, batch_size, seq_len, checkpointing, dtype)
    B, T, nb = batch_size, seq_len, FP32_BYTES
    analytic = nb * activation_elements(cfg, B, T, "handout", checkpointing)
    manual_cfg, fused_cfg = (dataclasses.replace(cfg, attn_impl=a) for a in ("manual", "sdpa"))
    rows = [[label, times(nb, formula), f"{nb * e:,}"]
            for _, label, formula, e in activation_rows(manual_cfg, B, T, "manual", checkpointing)]
    how = ", each block under torch.utils.checkpoint (non-reentrant)" if checkpointing else ""
    out = [f"Activations autograd keeps for backward: B={B}, T={T:,}, fp32, model.py with attn_impl=manual{how}",
           table(["tensor", "formula (bytes)", "bytes"], rows), ""]
    rows = [["handout's enumeration (--activations handout)", f"{analytic:,}", human_bytes(analytic), "", "1.00"]]
    other, recomputed = 0, []
    for c in (manual_cfg, fused_cfg):
        predicted = nb * activation_elements(c, B, T, c.attn_impl, checkpointing)
        measured = measure_saved_activations(c, B, T, checkpointing=checkpointing)
        other = max(other, measured["other"])
        rows.append([f"model.py, attn_impl={c.attn_impl}: formula / measured", f"{predicted:,}",
                     human_bytes(predicted), f"{measured['float']:,}", f"{measured['float'] / analytic:.2f}"])
        if checkpointing:  # plain - checkpointed = L x (one block's rows, less its input that checkpoint keeps)
            plain = measure_saved_activations(c, B, T)["float"]
            block = (plain - measured["float"]) // c.num_layers + nb * B * T * c.d_model
            formula = nb * sum(n for *_, n in recomputation_rows(c, B, T, c.attn_impl))
            recomputed.append(f"{c.attn_impl}: formula {formula:,} bytes, measured {block:,} "
                              "(= (without checkpointing - with) / L + one block input)")
    out += ["Measured with torch.autograd.graph.saved_tensors_hooks (each storage once; parameters excluded)",
            table(["", "formula", "", "measured", "measured / handout"], rows),
            f"(not counted: up to {human_bytes(other)} of int64 token ids and bool masks)",
            "The differences from the handout's enumeration are explained in saved_activations' docstring."]
    if checkpointing:
        out += ["During backward each block runs forward again and keeps one block's activations until its own "
                "backward ends:", *[f"  {line}" for line in recomputed]]
    return "\n".join(out)


def measure_report_16bit(cfg, B: int, T: int, checkpointing: bool, dtype: str) -> str:
    """--measure --dtype bf16|fp16: autocast's weight copies (exact) and the activations at ACTIVATION_BYTES each
    (an approximation: the factor printed is how far off it is for this config)."""
    na, rows = ACTIVATION_BYTES[dtype], []
    for impl in ("manual", "sdpa"):
        c = dataclasses.replace(cfg, attn_impl=impl)
        measured = measure_saved_activations(c, B, T, checkpointing=checkpointing, dtype=dtype)
        kept_copies = autocast_weight_bytes(c, dtype, checkpointing) - (
            na * block_matmul_params(c) if checkpointing else 0)  # the recomputed block's come back in backward
        predicted = na * activation_elements(c, B, T, impl, checkpointing)
        acts = measured["float"] - measured["weight_copies"]
        rows += [[f"attn_impl={impl}: autocast's weight copies kept", f"{kept_copies:,}",
                  f"{measured['weight_copies']:,}", f"{measured['weight_copies'] / kept_copies:.2f}"],
                 [f"attn_impl={impl}: activations at {na} bytes each", f"{predicted:,}", f"{acts:,}",
                  f"{acts / predicted:.2f}"]]
    how = ", each block under torch.utils.checkpoint" if checkpointing else ""
    return "\n".join([f"Saved for backward under CPU torch.autocast({dtype}): B={B}, T={T:,}{how}",
                      table(["", "formula (bytes)", "measured", "measured / formula"], rows),
                      "The weight copies are exact; activations count 2 bytes per element by convention (fp32 "
                      "RMSNorm tensors and the fp32 residual stream make autograd keep more: see ACTIVATION_BYTES)."])
