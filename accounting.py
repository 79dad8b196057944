"""What a Transformer LM costs: parameters, FLOPs, memory and training time, worked out analytically and
checked against the real model.py (CS336 assignment 1, §3.6 problem `transformer_accounting` and §4.3 problem
`adamwAccounting`).

Every figure is a small formula over the ModelConfig fields (vocab_size V, context_length, d_model d, num_layers L,
num_heads h, d_ff F) and the batch B and sequence length T, printed beside its number. Conventions:
  - a matmul of an (m x n) by an (n x p) matrix costs 2·m·n·p FLOPs (one multiply + one add per multiply-add;
    Kaplan et al. 2020 §2.1, PaLM appendix B). Counting a multiply-add as one FLOP halves every figure — a slip a
    published write-up of this very assignment made (tests/test_accounting.py pins the corrected GPT-2 XL figure);
  - training = forward + backward, backward = 2x forward (each matmul needs one product for the input's gradient
    and one for the weight's), plus AdamW's own element-wise FLOPs;
  - memory = fp32 parameters, gradients, AdamW's two moments, and the activations the handout enumerates.
tests/test_accounting.py checks the parameter count against sum(p.numel()) of model.TransformerLM, the FLOPs
against torch.utils.flop_counter, and the activation formula against the bytes autograd really saves (--measure).

    python accounting.py --preset gpt2-xl                                   # tables for GPT-2 XL
    python accounting.py --preset gpt2-xl --steps 400000 --batch-size 1024 --gpu a100 --mfu 0.5 --gpu-mem 80GB
    python accounting.py --compare            # all presets side by side;  --json for one machine-readable object
"""
import argparse
import dataclasses
import json
import math
import sys
import time

import torch

# ---------------------------------------------------------------------------------------------------------------
# Published dense peak throughput, FLOP/s per GPU (the MFU denominator on a GPU)
# ---------------------------------------------------------------------------------------------------------------
# note: datasheets print tensor-core figures "with sparsity" (2:4 structured sparsity, an asterisk); dense training
# gets half of that, which is what is listed here. "fp32" is the plain (non-tensor-core) FP32 rate — what the
# handout's questions assume; "tf32" is fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32).
# Sources: NVIDIA A100 datasheet (SXM 80GB, 2021); NVIDIA H100 Tensor Core GPU datasheet (SXM and PCIe columns);
# NVIDIA H200 Tensor Core GPU datasheet (SXM; same compute as H100 SXM, more and faster memory);
# NVIDIA V100 datasheet (SXM2; no bf16/tf32).
PEAK_FLOPS = {
    "v100": {"fp32": 15.7e12, "fp16": 125e12},
    "a100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
    "h100": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979e12},  # SXM
    "h100-pcie": {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12, "fp8": 1513e12},
    "h200": {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12, "fp8": 1979e12},  # SXM
}

BYTES_PER = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


# ---------------------------------------------------------------------------------------------------------------
# Parameters: one row per tensor kind (model.py names), shape formula, count
# ---------------------------------------------------------------------------------------------------------------
# A row is (name, shape formula, elements per copy, copies). Weights are (out, in) as in model.py. Tied embeddings
# share one (V, d) tensor between token_embeddings and lm_head, so it is counted once (as sum(p.numel()) does).

def param_rows(cfg) -> list[tuple[str, str, int, int]]:
    V, d, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    norm = cfg.norm != "none"
    rows = [("token_embeddings", "(V, d)", V * d, 1)]
    rows += [(f"layers.*.attn.{p}_proj", "(d, d)", d * d, L) for p in ("q", "k", "v", "output")]
    if cfg.ffn == "swiglu":  # w2 · (SiLU(w1 x) ⊙ w3 x)  (Shazeer 2020)
        rows += [("layers.*.ffn.w1", "(F, d)", F * d, L), ("layers.*.ffn.w2", "(d, F)", d * F, L),
                 ("layers.*.ffn.w3", "(F, d)", F * d, L)]
    else:  # w2 · SiLU(w1 x): the SiLU ablation drops w3
        rows += [("layers.*.ffn.w1", "(F, d)", F * d, L), ("layers.*.ffn.w2", "(d, F)", d * F, L)]
    if norm:  # RMSNorm gains; the post-norm ablation keeps the same three norms, only where they sit changes
        rows += [("layers.*.ln1", "(d,)", d, L), ("layers.*.ln2", "(d,)", d, L), ("ln_final", "(d,)", d, 1)]
    if not cfg.tie_embeddings:
        rows += [("lm_head", "(V, d)", V * d, 1)]
    return rows


def count_params(cfg) -> int:
    """Total parameters = sum over param_rows of elements x copies (== sum(p.numel()) of TransformerLM)."""
    return sum(n * k for _, _, n, k in param_rows(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Forward FLOPs: one row per matmul kind, 2·m·n·p each
# ---------------------------------------------------------------------------------------------------------------
# Per layer, for B sequences of T tokens (B·T rows through every projection):
#   QKV projections      3 x (B·T, d) @ (d, d)            -> 3 · 2·B·T·d·d
#   attention scores     B·h x (T, d/h) @ (d/h, T)  Q Kᵀ   -> 2·B·T·T·d     (summed over the h heads)
#   weighted values      B·h x (T, T) @ (T, d/h)    A V    -> 2·B·T·T·d
#   output projection    (B·T, d) @ (d, d)                 -> 2·B·T·d·d
#   FFN                  3 (SwiGLU) or 2 (SiLU) x (B·T, d) @ (d, F) or (B·T, F) @ (F, d) -> 3 or 2 · 2·B·T·d·F
# Once: LM head (B·T, d) @ (d, V) -> 2·B·T·d·V.
# Not counted (all O(B·T·d) or O(B·h·T²) element-wise work, a few percent at most): RMSNorm, RoPE, softmax, SiLU,
# residual adds, the embedding lookup (a gather, no arithmetic). The causal mask: the full T x T products are
# computed and then masked, which is what model.py (and the FLOP counter) do; a kernel that skips the masked upper
# triangle would do T(T+1)/2 of the T² dot products in QKᵀ and A V, saving almost half of those two rows.

def forward_flop_rows(cfg, batch_size: int = 1, seq_len: int | None = None) -> list[tuple[str, str, int]]:
    """(name, formula, FLOPs) for one forward pass over batch_size sequences of seq_len tokens."""
    B, T = batch_size, cfg.context_length if seq_len is None else seq_len
    V, d, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    n_ffn = 3 if cfg.ffn == "swiglu" else 2
    return [
        ("QKV projections", "L · 3 · 2·B·T·d·d", L * 3 * 2 * B * T * d * d),
        ("attention scores Q Kᵀ", "L · 2·B·T·T·d", L * 2 * B * T * T * d),
        ("attention-weighted values A V", "L · 2·B·T·T·d", L * 2 * B * T * T * d),
        ("output projection", "L · 2·B·T·d·d", L * 2 * B * T * d * d),
        (f"FFN ({'w1, w3, w2' if n_ffn == 3 else 'w1, w2'})", f"L · {n_ffn} · 2·B·T·d·F", L * n_ffn * 2 * B * T * d * F),
        ("LM head", "2·B·T·d·V", 2 * B * T * d * V),
    ]


def forward_flops(cfg, batch_size: int = 1, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one forward pass (== FlopCounterMode on model.TransformerLM with manual attention)."""
    return sum(f for _, _, f in forward_flop_rows(cfg, batch_size, seq_len))


def train_flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward matmul FLOPs (2 FLOPs per multiply-add,
    attention's QKᵀ and A V included), seq_len defaulting to config.context_length.

    THE formula for MFU in this project (train.py, bench/): MFU = train_flops_per_token · tokens/s / peak FLOP/s.
    Equal to 6·N_matmul + 12·L·T·d, where N_matmul counts the parameters used in matmuls (all but the token
    embedding gather and the norm gains; a tied lm_head still counts: it is a matmul). Works on any object with
    ModelConfig's attribute names."""
    T = config.context_length if seq_len is None else seq_len
    return 3 * forward_flops(config, 1, T) / T


# AdamW's own work, per parameter per step (the handout's Algorithm 1, one element-wise op = one FLOP):
ADAMW_FLOP_ROWS = [
    ("m ← β1·m + (1−β1)·g", 3),        # 2 multiplies, 1 add
    ("v ← β2·v + (1−β2)·g²", 4),       # square, 2 multiplies, 1 add
    ("θ ← θ − α_t·m / (√v + ε)", 5),   # sqrt, add, divide, multiply, subtract (α_t: per-step scalar work only)
    ("θ ← θ − α·λ·θ", 2),              # multiply by the scalar α·λ, subtract (decoupled weight decay)
]
ADAMW_FLOPS_PER_PARAM = sum(n for _, n in ADAMW_FLOP_ROWS)


# ---------------------------------------------------------------------------------------------------------------
# Memory for AdamW training: parameters, gradients, two moments, activations
# ---------------------------------------------------------------------------------------------------------------
# Activations, enumerated as in the handout's adamwAccounting problem: one tensor per step of the forward pass that
# backward needs, counted in elements for B sequences of T tokens (per layer unless marked "once").

def activation_rows(cfg, batch_size: int = 1, seq_len: int | None = None) -> list[tuple[str, str, int]]:
    """(name, element formula, elements) of the activations kept for backward."""
    B, T = batch_size, cfg.context_length if seq_len is None else seq_len
    V, d, L, F, h = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff, cfg.num_heads
    norm = cfg.norm != "none"
    rows = []
    if norm:
        rows.append(("RMSNorms ln1, ln2 (inputs)", "L · 2·B·T·d", L * 2 * B * T * d))
    rows += [
        ("QKV projections (Q, K, V)", "L · 3·B·T·d", L * 3 * B * T * d),
        ("Q Kᵀ scores", "L · B·h·T²", L * B * h * T * T),
        ("softmax probabilities", "L · B·h·T²", L * B * h * T * T),
        ("weighted sum of values", "L · B·T·d", L * B * T * d),
        ("output projection", "L · B·T·d", L * B * T * d),
        ("W1 x", "L · B·T·F", L * B * T * F),
    ]
    if cfg.ffn == "swiglu":
        rows.append(("W3 x", "L · B·T·F", L * B * T * F))
    rows.append(("SiLU(W1 x)", "L · B·T·F", L * B * T * F))
    if cfg.ffn == "swiglu":  # W2's input is SiLU(W1 x) ⊙ W3 x, a fourth (B, T, F) tensor
        rows.append(("W2 input SiLU(W1 x) ⊙ W3 x", "L · B·T·F", L * B * T * F))
    if norm:
        rows.append(("final RMSNorm (once)", "B·T·d", B * T * d))
    rows += [("logits (once)", "B·T·V", B * T * V), ("cross-entropy softmax (once)", "B·T·V", B * T * V)]
    return rows


def activation_elements(cfg, batch_size: int = 1, seq_len: int | None = None) -> int:
    return sum(n for _, _, n in activation_rows(cfg, batch_size, seq_len))


def train_memory(cfg, batch_size: int = 1, seq_len: int | None = None, bytes_per: int = 4) -> dict:
    """Bytes to train with AdamW: parameters + gradients + (m, v) = 4 copies of N, plus the activations."""
    N = count_params(cfg)
    mem = {"params": bytes_per * N, "grads": bytes_per * N, "adamw_state": 2 * bytes_per * N,
           "activations": bytes_per * activation_elements(cfg, batch_size, seq_len)}
    mem["total"] = sum(mem.values())
    return mem


def max_batch_size(cfg, mem_bytes: float, seq_len: int | None = None, bytes_per: int = 4) -> int:
    """Largest B with train_memory(B) <= mem_bytes: activations are linear in B, the rest is fixed (0 if none)."""
    fixed = 4 * bytes_per * count_params(cfg)
    per_seq = bytes_per * activation_elements(cfg, 1, seq_len)
    return max(0, math.floor((mem_bytes - fixed) / per_seq))


# ---------------------------------------------------------------------------------------------------------------
# Time: total training FLOPs over achieved throughput
# ---------------------------------------------------------------------------------------------------------------

def peak_flops(gpu: str, dtype: str = "fp32") -> float:
    """Published dense peak FLOP/s; ValueError naming the valid choices otherwise."""
    if gpu not in PEAK_FLOPS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(PEAK_FLOPS)}")
    if dtype not in PEAK_FLOPS[gpu]:
        raise ValueError(f"no published {dtype} peak for {gpu}; it has {', '.join(PEAK_FLOPS[gpu])}")
    return PEAK_FLOPS[gpu][dtype]


def train_flops(cfg, steps: int, batch_size: int, seq_len: int | None = None) -> float:
    """All FLOPs of a run: steps · B · T tokens at train_flops_per_token each, plus AdamW's 14·N per step."""
    T = cfg.context_length if seq_len is None else seq_len
    return steps * (batch_size * T * train_flops_per_token(cfg, T) + ADAMW_FLOPS_PER_PARAM * count_params(cfg))


def train_days(cfg, steps: int, batch_size: int, gpu: str, mfu: float, dtype: str = "fp32",
               seq_len: int | None = None) -> float:
    """Days on one GPU achieving mfu x its published dense peak for dtype."""
    return train_flops(cfg, steps, batch_size, seq_len) / (mfu * peak_flops(gpu, dtype)) / 86_400


# ---------------------------------------------------------------------------------------------------------------
# Measured: a torch.mm peak (the MFU denominator where no datasheet applies, e.g. a CPU)
# ---------------------------------------------------------------------------------------------------------------

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
        if dt * reps < 1e-3:
            reps *= 2
        if time.perf_counter() > deadline:
            return 2 * n**3 / best
