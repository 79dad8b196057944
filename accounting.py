"""What a Transformer LM costs: parameters, FLOPs, memory and training time, worked out analytically and
checked against the real model.py (CS336 assignment 1, §3.6 problem `transformer_accounting` and §4.3 problem
`adamwAccounting`).

Every figure is a small formula over the ModelConfig fields (vocab_size V, context_length, d_model d, num_layers L,
num_heads h, d_ff F) and the batch B and sequence length T, printed beside its number. Conventions:
  - a matmul of an (m x n) by an (n x p) matrix costs 2·m·n·p FLOPs (one multiply + one add per multiply-add;
    Kaplan et al. 2020 §2.1, PaLM appendix B). Counting a multiply-add as one FLOP halves every figure — a slip a
    published write-up of this very assignment made (tests/test_accounting.py pins the corrected GPT-2 XL figure);
  - training = forward + backward, backward = 2x forward (each matmul needs one product for the input's gradient
    and one for the weight's), plus AdamW's own element-wise FLOPs; activation checkpointing adds the blocks'
    forward once more (≈ 4x forward; recompute_flops), which MFU does not count;
  - memory per GPU = fp32 parameters, gradients and AdamW's two moments (sharded N ways under FSDP2, --fsdp N, plus
    the unsharded units it gathers), and the activations kept for backward: by default the ones model.py's fast
    path keeps with the fused attention train.py runs (--activations sdpa: no T x T matrices), or those of the
    from-scratch attention (manual), or the handout's enumeration (handout); with --activation-checkpointing only
    the block inputs are kept, plus one block while it is recomputed. Activations take 4 bytes in fp32, 2 in
    bf16/fp16 (--dtype; a stated convention, see ACTIVATION_BYTES), plus autocast's 16-bit weight copies.
The tables come in the order the numbers build on each other: parameters -> forward FLOPs -> training FLOPs ->
memory (+ FSDP2) -> time (PEAK_FLOPS, the MFU denominator on a GPU) -> presets -> printing -> the CLI.
tests/test_accounting.py checks the parameter count against sum(p.numel()) of model.TransformerLM, the FLOPs
against torch.utils.flop_counter, the activation rows against the bytes autograd really saves (--measure; with
and without checkpointing), and the FSDP2 shards against torch.chunk and a real 2-rank fully_shard run. The
measuring code (saved bytes, a measured torch.mm peak, the machine line) lives in lib/measure.py.

    python accounting.py --preset gpt2-xl                                   # tables for GPT-2 XL
    python accounting.py --preset gpt2-xl --steps 400000 --batch-size 1024 --gpu a100 --mfu 0.5 --gpu-mem 80GB
    python accounting.py --compare     # all presets side by side; more (--measure, --fsdp, --fsdp-table): --help
"""
import dataclasses
import json
import math

import torch

import model
from lib.cli import OneLineParser, human_bytes, parse_bytes, positive_int  # (decimal units: 1 GB = 1e9 bytes)

# ---------------------------------------------------------------------------------------------------------------
# Parameters: one row per tensor kind (model.py names), shape formula, count
# ---------------------------------------------------------------------------------------------------------------
# A row is (name, shape formula, elements per copy, copies). Weights are (out, in) as in model.py. Tied embeddings
# share one (V, d) tensor between token_embeddings and lm_head, so it is counted once (as sum(p.numel()) does).

ATTN_PROJECTIONS = ("q", "k", "v", "output")  # model.py's four (d, d) attention matrices per layer


def ffn_matrices(cfg) -> int:
    """Matrices in one FFN: 3 for SwiGLU (w1, w2, w3; Shazeer 2020), 2 for the SiLU ablation (w1, w2)."""
    return 3 if cfg.ffn == "swiglu" else 2


def param_shapes(cfg) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, shape formula, shape, copies) of every kind of parameter tensor; copies = L for the blocks' ones."""
    V, d, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    rows = [("token_embeddings", "(V, d)", (V, d), 1)]
    rows += [(f"layers.*.attn.{p}_proj", "(d, d)", (d, d), L) for p in ATTN_PROJECTIONS]
    if cfg.ffn == "swiglu":  # w2 · (SiLU(w1 x) ⊙ w3 x)  (Shazeer 2020)
        rows += [("layers.*.ffn.w1", "(F, d)", (F, d), L), ("layers.*.ffn.w2", "(d, F)", (d, F), L),
                 ("layers.*.ffn.w3", "(F, d)", (F, d), L)]
    else:  # w2 · SiLU(w1 x): the SiLU ablation drops w3
        rows += [("layers.*.ffn.w1", "(F, d)", (F, d), L), ("layers.*.ffn.w2", "(d, F)", (d, F), L)]
    if cfg.norm != "none":  # RMSNorm gains: one per sublayer and a final one (model.py keeps it for post-norm too)
        rows += [("layers.*.ln1", "(d,)", (d,), L), ("layers.*.ln2", "(d,)", (d,), L), ("ln_final", "(d,)", (d,), 1)]
    if not cfg.tie_embeddings:
        rows += [("lm_head", "(V, d)", (V, d), 1)]
    return rows


def param_rows(cfg) -> list[tuple[str, str, int, int]]:
    """(name, shape formula, elements per copy, copies): param_shapes with each shape's element count."""
    return [(name, formula, math.prod(shape), copies) for name, formula, shape, copies in param_shapes(cfg)]


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

def _seq_len(cfg, seq_len: int | None) -> int:
    """T for every per-sequence figure in this file: seq_len when given, else the model's context_length."""
    return cfg.context_length if seq_len is None else seq_len


def forward_flop_rows(cfg, batch_size: int = 1, seq_len: int | None = None) -> list[tuple[str, str, str, int]]:
    """(id, label, formula, FLOPs) for one forward pass over batch_size sequences of seq_len tokens.

    The id is what code looks a row up by (forward_flops_by_id); the label is only for printing (and --json's keys)."""
    B, T = batch_size, _seq_len(cfg, seq_len)
    V, d, L, F = cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_ff
    n_ffn = ffn_matrices(cfg)
    return [
        ("qkv", "QKV projections", "L · 3 · 2·B·T·d·d", L * 3 * 2 * B * T * d * d),
        ("attn_scores", "attention scores Q Kᵀ", "L · 2·B·T·T·d", L * 2 * B * T * T * d),
        ("attn_values", "attention-weighted values A V", "L · 2·B·T·T·d", L * 2 * B * T * T * d),
        ("out_proj", "output projection", "L · 2·B·T·d·d", L * 2 * B * T * d * d),
        ("ffn", "FFN", f"L · {n_ffn} · 2·B·T·d·F ({'w1, w3, w2' if n_ffn == 3 else 'w1, w2'})",
         L * n_ffn * 2 * B * T * d * F),
        ("lm_head", "LM head", "2·B·T·d·V", 2 * B * T * d * V),
    ]


def forward_flops(cfg, batch_size: int = 1, seq_len: int | None = None) -> int:
    """Matmul FLOPs of one forward pass (== FlopCounterMode on model.TransformerLM with manual attention)."""
    return sum(f for *_, f in forward_flop_rows(cfg, batch_size, seq_len))


def forward_flops_by_id(cfg, batch_size: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """{row id: FLOPs} of forward_flop_rows, e.g. ["attn_scores"] + ["attn_values"] for attention's share."""
    return {row_id: f for row_id, *_, f in forward_flop_rows(cfg, batch_size, seq_len)}


def block_matmul_params(cfg) -> int:
    """The matmul parameters of one block: its four attention projections and its FFN matrices."""
    return len(ATTN_PROJECTIONS) * cfg.d_model**2 + ffn_matrices(cfg) * cfg.d_model * cfg.d_ff


def matmul_params(cfg) -> int:
    """N_matmul: the parameters that take part in a matmul — all but the embedding (a gather) and the norm gains;
    a tied lm_head still counts (it is a matmul). Forward FLOPs per token = 2·N_matmul + 4·L·T·d (attention)."""
    return cfg.num_layers * block_matmul_params(cfg) + cfg.vocab_size * cfg.d_model


# ---------------------------------------------------------------------------------------------------------------
# Training FLOPs: forward + backward (3 x forward), recomputation, AdamW's own element-wise work
# ---------------------------------------------------------------------------------------------------------------

def train_flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token: forward + backward = 3 x forward matmul FLOPs (2 FLOPs per multiply-add,
    attention's QKᵀ and A V included), seq_len defaulting to config.context_length.

    THE formula for MFU in this project (train.py, bench/): MFU = train_flops_per_token · tokens/s / peak FLOP/s.
    Equal to 6·matmul_params(config) + 12·L·T·d. Works on any object with ModelConfig's attribute names."""
    T = _seq_len(config, seq_len)
    return 3 * forward_flops(config, 1, T) / T


def recompute_flops(cfg, batch_size: int = 1, seq_len: int | None = None) -> int:
    """Matmul FLOPs activation checkpointing adds to a training step: every block's forward once more, in backward
    (training ≈ 4 x forward instead of 3 x; the LM head, outside the checkpoints, is not recomputed).

    subtle: non-reentrant checkpoint stops recomputing as soon as it has re-saved the last tensor backward needs
    ("early stop"), and a matmul saves its inputs before it computes. In a pre-norm or norm-free block the last op
    that saves anything is w2 (the residual add after it keeps nothing), so w2 itself is never recomputed; post-norm's
    ln2 comes after w2, so there the whole block is. FlopCounterMode over a checkpointed step agrees exactly.
    Not part of MFU, which counts the model's FLOPs only (PaLM appendix B; with recomputation it is HFU)."""
    f = forward_flops_by_id(cfg, batch_size, seq_len)
    blocks = sum(f.values()) - f["lm_head"]
    w2 = f["ffn"] // ffn_matrices(cfg)  # one of the FFN's equal-sized matmuls
    return blocks - (0 if cfg.norm == "post" else w2)


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
FP32_BYTES = torch.finfo(torch.float32).bits // 8  # 4: the training state is fp32, as in the handout's problem
BF16_BYTES = torch.finfo(torch.bfloat16).bits // 8  # 2: the Parameters table also gives the bf16 size
# What AdamW training keeps per parameter besides activations, in copies of N: the weights, their gradients and
# AdamW's two moments m and v (Loshchilov & Hutter 2019, Algorithm 2) — 4 copies, 16 bytes per parameter in fp32.
# They stay fp32 under every --dtype: mixed precision computes in 16 bits but keeps fp32 master weights, gradients
# and optimizer state (Micikevicius et al. 2018).
TRAIN_STATE_COPIES = {"params": 1, "grads": 1, "adamw_state": 2}

# --dtype: what the matmuls compute in, and so what the activations are stored in. bf16 and fp16 are mixed precision
# as train.py runs it: torch.autocast on one GPU or under DDP, MixedPrecisionPolicy(param_dtype=...) under FSDP2;
# tf32 is fp32 storage with tensor-core matmuls. Convention, stated once: every activation row counts
# ACTIVATION_BYTES[dtype] per element. For fp32 that is exact (--measure); in 16 bits it is the usual simplification:
# model.py's RMSNorm computes in fp32 and keeps fp32 tensors, under autocast the residual stream stays fp32 and
# each matmul keeps its own 16-bit copy of its input, and on CPU attention with head dim <= 64 runs in fp32
# (kernels.fused_attention), so on CPU autograd keeps 1.1-1.6x the 2-byte figure at the sizes tested (--measure
# --dtype bf16 prints the factor; tests/test_accounting.py bounds it).
COMPUTE_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATION_BYTES = {name: torch.finfo(dt).bits // 8 for name, dt in COMPUTE_DTYPES.items()}  # 4, 4, 2, 2


def autocast_weight_bytes(cfg, dtype: str, checkpointing: bool = False) -> int:
    """Autocast's 16-bit copies of the matmul weights (0 in fp32 or tf32, which cast nothing). Each matmul casts its
    weight and keeps the copy for backward: ACTIVATION_BYTES · N_matmul. subtle: model.py's Linear multiplies by
    weight.T, a view, and autocast's weight cache holds casts of leaf tensors only, so nothing is cached: with
    checkpointing the blocks' copies go with the checkpoint, and what is kept is lm_head's (V·d) plus, while it is
    recomputed, one block's (block_matmul_params). Both exact for what saved_tensors_hooks see (the tests).
    Not under FSDP2, whose MixedPrecisionPolicy gathers 16-bit weights instead (fsdp_gathered_bytes)."""
    if COMPUTE_DTYPES[dtype] == torch.float32:
        return 0
    copies = cfg.vocab_size * cfg.d_model + block_matmul_params(cfg) if checkpointing else matmul_params(cfg)
    return ACTIVATION_BYTES[dtype] * copies


# Activations: what the forward pass keeps for backward, counted in elements for B sequences of T tokens. A row is
# (id, label, formula, elements); each enumeration gives one block's rows and the rows outside the blocks, and
# activation_rows multiplies the block's by L. Three enumerations (--activations):
#   sdpa     model.py as train.py runs it (fast=True, attn_impl="sdpa"): the fused attention kernel keeps its output
#            and a logsumexp per row, never the T x T scores (flash attention's memory saving; Dao et al. 2022);
#   manual   model.py's fast path with the from-scratch attention (attn_impl="manual"): the T x T matrices kept;
#   handout  the handout's adamwAccounting enumeration: one tensor per step of the forward pass, including the
#            T x T scores and probabilities, as if attention were computed unfused.
# sdpa and manual are exact (== the bytes saved_tensors_hooks see in fp32, tests/test_accounting.py); handout is the
# problem's model, within ~25% of what autograd really keeps at the project's sizes but far off for long contexts or
# large batches with sdpa (it counts B·h·T² elements per layer twice that a flash kernel never stores).
ACTIVATIONS = ("sdpa", "manual", "handout")
DEFAULT_ACTIVATIONS = "sdpa"  # model.ModelConfig's default attn_impl: what train.py runs


def handout_activations(cfg, batch_size: int = 1, seq_len: int | None = None) -> tuple[list, list]:
    """(one block's rows, rows outside the blocks) of the handout's adamwAccounting enumeration."""
    B, T = batch_size, _seq_len(cfg, seq_len)
    V, d, F, h = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads
    norm = cfg.norm != "none"
    block = [("ln_inputs", "RMSNorms ln1, ln2 (inputs)", "2·B·T·d", 2 * B * T * d)] if norm else []
    block += [
        ("qkv", "QKV projections (Q, K, V)", "3·B·T·d", 3 * B * T * d),
        ("scores", "Q Kᵀ scores", "B·h·T²", B * h * T * T),
        ("probs", "softmax probabilities", "B·h·T²", B * h * T * T),
        ("attn_values", "weighted sum of values", "B·T·d", B * T * d),
        ("out_proj", "output projection", "B·T·d", B * T * d),
        ("w1", "W1 x", "B·T·F", B * T * F),
    ]
    if cfg.ffn == "swiglu":
        block.append(("w3", "W3 x", "B·T·F", B * T * F))
    block.append(("silu", "SiLU(W1 x)", "B·T·F", B * T * F))
    if cfg.ffn == "swiglu":  # W2's input is SiLU(W1 x) ⊙ W3 x, a fourth (B, T, F) tensor
        block.append(("w2_input", "W2 input SiLU(W1 x) ⊙ W3 x", "B·T·F", B * T * F))
    outside = [("ln_final", "final RMSNorm (once)", "B·T·d", B * T * d)] if norm else []
    outside += [("logits", "logits (once)", "B·T·V", B * T * V),
                ("ce_softmax", "cross-entropy softmax (once)", "B·T·V", B * T * V)]
    return block, outside


def saved_activations(cfg, batch_size: int = 1, seq_len: int | None = None) -> tuple[list, list]:
    """(one block's rows, rows outside the blocks) of the floating-point tensors autograd really keeps for backward
    when model.py's TransformerLM (with cfg.attn_impl) + optim.cross_entropy run in fp32 on their fast path
    (fast=True, what train.py runs) — measured exactly by --measure. note: the readable default path (fast=False)
    keeps more (each line of RMSNorm, SiLU, softmax, RoPE and the loss saves its own intermediates); these rows
    describe the fast path only.

    The handout's enumeration is a model of that; this is the ground truth for this implementation, derived op by op
    (an op keeps what its derivative needs: x² keeps x, exp keeps its output, a @ b keeps a and b, a · w keeps a).
    Where it differs from the handout's, and why:
      - RMSNorm (its hand-written backward, kernels._RMSNormFunction) keeps its input x (in fp32) and 1/rms (B·T);
        its output is kept by the next matmul: 2 B·T·d, not 1;
      - the from-scratch softmax keeps the masked scores (for the max), exp and the probabilities: 3 B·h·T², not 2,
        plus the row max and row sum (B·h·T each); the fused sdpa kernel keeps none of these, only its output and a
        logsumexp per row (flash attention's memory saving);
      - RoPE (its complex fast path) keeps its rotations e^(i·angle), T·d/(2h) complex numbers = T·d/h floats for Q
        and for K, the same for every sequence of the batch (counted as fp32 whatever the autocast dtype: 2·T·d/h
        fp32 elements are 4·T·d/h 16-bit ones, negligible either way);
      - SwiGLU's gate (kernels._SwiGLUGate) keeps a = W1 x and W3 x and computes SiLU(a) again in backward; with the
        product (kept by w2) that is 3 B·T·F, where the handout counts 4 (SiLU(a) too). The SiLU ablation's
        kernels.silu (one kernel) keeps only its input: 2 B·T·F (the readable a·σ(a) would keep σ(a) too);
      - the output projection's output goes into a residual add, which keeps nothing; with the from-scratch
        attention the heads are merged by a copy that the projection keeps (1 B·T·d, not 2), with sdpa by a free view;
      - optim.cross_entropy keeps only the logits, from which its hand-written backward rebuilds softmax - onehot;
        nothing else keeps a (B, T, V) tensor: one B·T·V tensor, not two."""
    B, T = batch_size, _seq_len(cfg, seq_len)
    V, d, F, h = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads
    block = []
    if cfg.norm != "none":
        block.append(("rmsnorm", "RMSNorm ln1, ln2: x, 1/rms", "2·(B·T·d + B·T)", 2 * (B * T * d + B * T)))
    block += [("proj_inputs", "inputs of q/k/v_proj and w1/w3", "2·B·T·d", 2 * B * T * d),
              ("qkv", "Q, K after RoPE, V", "3·B·T·d", 3 * B * T * d)]
    if cfg.position == "rope":
        block.append(("rope", "RoPE rotations e^(i·angle), complex (for Q and for K)", "2·T·d/h", 2 * T * (d // h)))
    if cfg.attn_impl == "manual":
        block.append(("softmax", "masked scores, exp, probabilities", "3·B·h·T²", 3 * B * h * T * T))
        block.append(("softmax_stats", "softmax row max and row sum", "2·B·h·T", 2 * B * h * T))
    else:
        block.append(("sdpa", "sdpa output and logsumexp", "B·T·d + B·h·T", B * T * d + B * h * T))
    # subtle: the fused CPU kernel returns its output in the query's memory layout. model.py computes Q as a
    # transposed view of q_proj's (B, T, H, D) output (RoPE runs before the head transpose), so the (B, H, T, D)
    # result already sits in memory as (B, T, C) and the head merge is a free view of the sdpa output kept above.
    # The from-scratch path's `probs @ V` is contiguous as (B, H, T, D), so its merge is a copy that output_proj keeps.
    if cfg.attn_impl == "manual":
        block.append(("merged_heads", "merged heads (output_proj input)", "B·T·d", B * T * d))
    if cfg.ffn == "swiglu":
        block.append(("ffn", "W1 x, W3 x, product", "3·B·T·F", 3 * B * T * F))
    else:
        block.append(("ffn", "W1 x, SiLU(W1 x)", "2·B·T·F", 2 * B * T * F))
    outside = []
    if cfg.norm != "none":
        outside.append(("ln_final", "ln_final: x, 1/rms (once)", "B·T·d + B·T", B * T * d + B * T))
    outside += [("lm_head_input", "lm_head input (once)", "B·T·d", B * T * d),
                ("loss", "loss: logits (once)", "B·T·V", B * T * V)]
    return block, outside


def activation_parts(cfg, batch_size: int = 1, seq_len: int | None = None,
                     activations: str = DEFAULT_ACTIVATIONS) -> tuple[list, list]:
    """(one block's rows, rows outside the blocks) of the enumeration `activations` (one of ACTIVATIONS).
    note: sdpa and manual are model.py's rows for that attention, whatever cfg.attn_impl says."""
    if activations == "handout":
        return handout_activations(cfg, batch_size, seq_len)
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
    return saved_activations(dataclasses.replace(cfg, attn_impl=activations), batch_size, seq_len)


def times(factor, formula: str) -> str:
    """A formula times a factor: times('L', '2·B·T·d') -> 'L · 2·B·T·d'; a sum gets parentheses:
    times(4, 'B·T·d + B·h·T') -> '4 · (B·T·d + B·h·T)'."""
    depth, top_level_sum = 0, False
    for ch in formula:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        top_level_sum |= ch == "+" and depth == 0
    return f"{factor} · ({formula})" if top_level_sum else f"{factor} · {formula}"


# Activation checkpointing (--activation-checkpointing; Chen et al. 2016, "Training Deep Nets with Sublinear Memory
# Cost"): torch.utils.checkpoint(block, x, use_reentrant=False) around each TransformerBlock keeps only the block's
# input x from forward to backward (the checkpoint packs it like a saved tensor; nothing inside the block is kept) and
# runs the block's forward again inside backward, just before its gradients are needed. So:
#   kept from forward to backward = L · B·T·d block inputs + the rows outside the blocks (ln_final, lm_head, loss);
#   live again during backward    = one block's rows while that block is recomputed (recomputation_rows).
# Memory counts both: an upper bound on the peak of kept tensors, since the outside tensors are freed by the loss's,
# lm_head's and ln_final's backward before the first block is recomputed; and the block's input is among its own
# rows, so B·T·d of it is counted twice (a few % of one block).

def activation_rows(cfg, batch_size: int = 1, seq_len: int | None = None, activations: str = DEFAULT_ACTIVATIONS,
                    checkpointing: bool = False) -> list[tuple[str, str, str, int]]:
    """(id, label, formula, elements) of the activations kept from forward to backward: L x one block's rows and
    the rest, or, with checkpointing, the L block inputs and the rest. What saved_tensors_hooks see (--measure)."""
    block, outside = activation_parts(cfg, batch_size, seq_len, activations)
    L, B, T, d = cfg.num_layers, batch_size, _seq_len(cfg, seq_len), cfg.d_model
    if checkpointing:
        return [("block_inputs", "block inputs (kept by checkpoint)", "L · B·T·d", L * B * T * d)] + outside
    return [(row_id, label, times("L", formula), L * n) for row_id, label, formula, n in block] + outside


def recomputation_rows(cfg, batch_size: int = 1, seq_len: int | None = None,
                       activations: str = DEFAULT_ACTIVATIONS) -> list[tuple[str, str, str, int]]:
    """With checkpointing: the rows of the one block being recomputed in backward (live until its backward ends)."""
    block, _ = activation_parts(cfg, batch_size, seq_len, activations)
    return [(f"recomputed.{row_id}", f"{label} (one block, recomputed)", formula, n)
            for row_id, label, formula, n in block]


def activation_elements(cfg, batch_size: int = 1, seq_len: int | None = None, activations: str = DEFAULT_ACTIVATIONS,
                        checkpointing: bool = False) -> int:
    """Elements kept from forward to backward (the sum of activation_rows)."""
    return sum(n for *_, n in activation_rows(cfg, batch_size, seq_len, activations, checkpointing))


def activation_memory_rows(cfg, batch_size: int = 1, seq_len: int | None = None,
                           activations: str = DEFAULT_ACTIVATIONS, checkpointing: bool = False) -> list:
    """The rows memory counts: activation_rows, plus recomputation_rows with checkpointing."""
    rows = activation_rows(cfg, batch_size, seq_len, activations, checkpointing)
    return rows + (recomputation_rows(cfg, batch_size, seq_len, activations) if checkpointing else [])


def train_memory(cfg, batch_size: int = 1, seq_len: int | None = None, activations: str = DEFAULT_ACTIVATIONS,
                 checkpointing: bool = False, dtype: str = "fp32", fsdp: int | None = None) -> dict:
    """Bytes per GPU to train with AdamW, batch_size sequences per GPU: parameters + gradients + (m, v) = 4 fp32
    copies of N (under FSDP2 over `fsdp` GPUs: rank 0's shards of them, fsdp_shard_bytes, plus the gathered
    parameters, fsdp_gathered_bytes), autocast's weight copies (16-bit dtypes without FSDP), and the activations at
    ACTIVATION_BYTES[dtype] each. fsdp=None: one GPU, or any DDP rank (each holds all of it)."""
    N = count_params(cfg)
    if fsdp is None:
        mem = {part: copies * FP32_BYTES * N for part, copies in TRAIN_STATE_COPIES.items()}
    else:
        mem = fsdp_shard_bytes(cfg, fsdp)
    mem["gathered"] = 0 if fsdp is None else fsdp_gathered_bytes(cfg, dtype)
    mem["autocast_weights"] = autocast_weight_bytes(cfg, dtype, checkpointing) if fsdp is None else 0
    rows = activation_memory_rows(cfg, batch_size, seq_len, activations, checkpointing)
    mem["activations"] = ACTIVATION_BYTES[dtype] * sum(n for *_, n in rows)
    mem["total"] = sum(mem.values())
    return mem


def max_batch_size(cfg, mem_bytes: float, seq_len: int | None = None, **memory) -> int:
    """Largest B with train_memory(B, **memory) <= mem_bytes (0 if none). Activations are a + b·B: most rows grow
    with B, RoPE's cos/sin rows do not, so the fixed part is train_memory at B = 0."""
    fixed = train_memory(cfg, 0, seq_len, **memory)["total"]
    per_seq = train_memory(cfg, 1, seq_len, **memory)["total"] - fixed
    return max(0, math.floor((mem_bytes - fixed) / per_seq))


# ---------------------------------------------------------------------------------------------------------------
# Memory per GPU under FSDP2 (torch.distributed.fsdp.fully_shard on each block and on the root; --fsdp N)
# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (PyTorch's fully_shard; Zhao et al. 2023 for FSDP) splits every parameter on dim 0 across the N ranks: as
# torch.chunk(p, N, dim=0) does, rank r holds rows r·c .. (r+1)·c - 1 of the dim0 rows, c = ceil(dim0 / N), fewer
# (or none) at the end. Rank 0 always holds c rows of every parameter, the most any rank holds, and c rows are
# also what every rank allocates for its parameter and gradient shards (FSDP2 pads dim 0 to a multiple of N), so
# rank 0's bytes are the per-GPU figure. Gradients are reduce-scattered into the same shards (reduce dtype fp32) and
# AdamW's m and v are zeros_like(shard). What is left per GPU is the unsharded ("gathered") parameters FSDP2 needs
# at once, in the param dtype (16-bit under MixedPrecisionPolicy(param_dtype=bf16|fp16), else fp32):
#   the root unit (token_embeddings, ln_final, lm_head): fully_shard keeps the root's parameters unsharded from
#     forward to backward (reshard_after_forward defaults to False for the root), while
#   one block's: each block is all-gathered before its forward (and again before its backward) and freed after.
# Not counted: the next block's all-gather in flight (FSDP2 prefetches one unit ahead), the all-gather and
# reduce-scatter buffers, and a block's unsharded gradients before they are reduce-scattered — each about one more
# block's parameters (GPT-2 XL: 41M, 82 MB in bf16), small beside the sharded state and the activations.

def fsdp_shard_rows(dim0: int, world_size: int, rank: int = 0) -> int:
    """Rows of a dim0-row parameter on `rank` of world_size: torch.chunk's split, c = ceil(dim0 / N) per rank."""
    c = -(-dim0 // world_size)  # ceil
    return max(0, min(c, dim0 - rank * c))


def fsdp_shard_bytes(cfg, world_size: int, dtype_bytes: int = FP32_BYTES, rank: int = 0) -> dict:
    """Bytes of rank's shards under FSDP2 over world_size ranks: {"params", "grads", "adamw_state"} — the local
    parts of the sharded parameters (p.to_local()), of their gradients and of AdamW's m and v, each shard
    fsdp_shard_rows(p.shape[0]) rows of p. Rank 0's are the most and the per-GPU figure (see above)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {world_size} and {rank}")
    shard = sum(copies * fsdp_shard_rows(shape[0], world_size, rank) * math.prod(shape[1:])
                for _, _, shape, copies in param_shapes(cfg))
    return {part: copies * dtype_bytes * shard for part, copies in TRAIN_STATE_COPIES.items()}


def fsdp_unit_params(cfg) -> dict:
    """Unsharded parameters of FSDP2's units: {"root": embedding, ln_final, lm_head; "block": one block}."""
    block = sum(math.prod(shape) for name, _, shape, _ in param_shapes(cfg) if name.startswith("layers."))
    return {"root": count_params(cfg) - cfg.num_layers * block, "block": block}


def fsdp_gathered_bytes(cfg, dtype: str = "fp32") -> int:
    """The unsharded parameters live at once per GPU: the root unit plus one block, in the param dtype."""
    units = fsdp_unit_params(cfg)
    return ACTIVATION_BYTES[dtype] * (units["root"] + units["block"])


# ---------------------------------------------------------------------------------------------------------------
# Time: total training FLOPs over achieved throughput
# ---------------------------------------------------------------------------------------------------------------
# Published dense peak throughput, FLOP/s per GPU (the MFU denominator on a GPU).
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

SECONDS_PER_DAY = 24 * 60 * 60


def peak_flops(gpu: str, dtype: str = "fp32") -> float:
    """Published dense peak FLOP/s; ValueError naming the valid choices otherwise."""
    if gpu not in PEAK_FLOPS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(PEAK_FLOPS)}")
    if dtype not in PEAK_FLOPS[gpu]:
        raise ValueError(f"no published {dtype} peak for {gpu}; it has {', '.join(PEAK_FLOPS[gpu])}")
    return PEAK_FLOPS[gpu][dtype]


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    """The published peak for a CUDA device as torch.cuda.get_device_name() names it, or None when the GPU or dtype
    is not in PEAK_FLOPS (an MFU left blank rather than a made-up one).

    A key matches when each of its dash-separated parts is in the lowercased name: "NVIDIA H100 80GB HBM3" -> h100,
    "NVIDIA H100 PCIe" -> h100-pcie (longer keys are tried first, so the PCIe card is not taken for the SXM one),
    "NVIDIA A100-SXM4-80GB" -> a100. dtype "fp32" reads the tf32 figure: on CUDA train.py runs fp32 matmuls on
    TF32 tensor cores (torch.set_float32_matmul_precision("high")), so that is the rate it can reach."""
    name = device_name.lower()
    for gpu in sorted(PEAK_FLOPS, key=len, reverse=True):
        if all(part in name for part in gpu.split("-")):
            return PEAK_FLOPS[gpu].get("tf32" if dtype == "fp32" else dtype)
    return None


def train_flops(cfg, steps: int, batch_size: int, seq_len: int | None = None, checkpointing: bool = False) -> float:
    """All FLOPs of a run: steps · B · T tokens at train_flops_per_token each, plus AdamW's 14·N per step, plus
    with checkpointing the blocks' forward once more (recompute_flops)."""
    T = _seq_len(cfg, seq_len)
    recompute = recompute_flops(cfg, batch_size, T) if checkpointing else 0
    return steps * (batch_size * T * train_flops_per_token(cfg, T) + recompute
                    + ADAMW_FLOPS_PER_PARAM * count_params(cfg))


def train_days(cfg, steps: int, batch_size: int, gpu: str, mfu: float, dtype: str = "fp32",
               seq_len: int | None = None, checkpointing: bool = False, num_gpus: int = 1) -> float:
    """Days for num_gpus GPUs (batch_size sequences per step in all) doing all of train_flops, each at mfu x its
    published dense peak for dtype. note: with checkpointing, mfu is read as the fraction of peak the GPU sustains
    on every FLOP it does, recomputation included (what PaLM calls HFU), so the recomputation makes the run longer."""
    flops = train_flops(cfg, steps, batch_size, seq_len, checkpointing)
    return flops / (num_gpus * mfu * peak_flops(gpu, dtype)) / SECONDS_PER_DAY


# ---------------------------------------------------------------------------------------------------------------
# Presets: GPT-2 sizes as the handout's transformer_accounting problem gives them, plus model.PRESETS
# ---------------------------------------------------------------------------------------------------------------
# (num_layers, d_model, num_heads) of the four GPT-2 sizes (Radford et al. 2019), as the handout's
# transformer_accounting problem lists them; vocab 50,257 and context 1,024 for all; d_ff = 4·d_model (the handout's
# GPT-2 XL has d_ff = 6,400 = 4 · 1,600: its SwiGLU FFN keeps GPT-2's width rather than the 8/3·d_model rule, and the
# smaller sizes follow the same rule). gpt2-xl-16k is the problem's last question: GPT-2 XL at context 16,384.
GPT2_SHAPES = {"gpt2-small": (12, 768, 12), "gpt2-medium": (24, 1024, 16), "gpt2-large": (36, 1280, 20),
               "gpt2-xl": (48, 1600, 25)}


def presets() -> dict:
    """name -> model.ModelConfig: the GPT-2 family, gpt2-xl-16k, and model.PRESETS (ts17m, tiny) themselves."""
    out = {name: model.ModelConfig(vocab_size=50_257, context_length=1024, d_model=d, num_layers=L, num_heads=h,
                                   d_ff=4 * d)
           for name, (L, d, h) in GPT2_SHAPES.items()}
    out["gpt2-xl-16k"] = dataclasses.replace(out["gpt2-xl"], context_length=16_384)
    out.update(model.PRESETS)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Printing: aligned tables with human units, every table for one config (the text and --json views of the same
# numbers), presets side by side, the FSDP table
# ---------------------------------------------------------------------------------------------------------------

def human(x: float, unit: str = "") -> str:
    """Four significant digits: human(2127057600) -> '2.127B'; with a unit, SI prefixes:
    human(4.513e12, 'FLOP') -> '4.513 TFLOP'."""
    if unit:
        prefixes = [(1e21, " Z"), (1e18, " E"), (1e15, " P"), (1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k"),
                    (1, " ")]
    else:
        prefixes = [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")]
    for scale, p in prefixes:
        if abs(x) >= scale:
            return f"{x / scale:.4g}{p}{unit}"
    return f"{x:.4g}{prefixes[-1][1]}{unit}"


def human_days(days: float) -> str:
    """6583.57 -> '6,583.6 days (18.0 years)'; under a day in hours, under an hour in minutes."""
    if days >= 1:
        return f"{days:,.1f} days ({days / 365.25:.1f} years)"
    return f"{days * 24:.2f} hours" if days * 24 >= 1 else f"{days * 24 * 60:.2f} minutes"


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    """Columns padded to their widest cell; columns in `right` (default: all but the first) right-aligned."""
    right = set(range(1, len(headers))) if right is None else right
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def describe(cfg) -> str:
    ablations = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("norm", "position", "ffn", "tie_embeddings"))
    return (f"vocab_size V={cfg.vocab_size:,}  context_length={cfg.context_length:,}  d_model d={cfg.d_model:,}  "
            f"num_layers L={cfg.num_layers}  num_heads h={cfg.num_heads}  d_ff F={cfg.d_ff:,}\n{ablations}")

def summary(cfg, batch_size: int = 1, seq_len: int | None = None, gpu_mem: float | None = None,
            steps: int | None = None, gpu: str | None = None, mfu: float | None = None, dtype: str = "fp32",
            activations: str = DEFAULT_ACTIVATIONS, checkpointing: bool = False, fsdp: int | None = None) -> dict:
    """All headline numbers for one config as plain JSON-ready values (what --json prints).

    Memory: "train_memory" is one GPU's parts as configured (with fsdp: each of fsdp GPUs under FSDP2),
    "train_memory_bytes_per_gpu" their total and "max_batch_per_gpu" the largest B per GPU in gpu_mem;
    "train_memory_bytes" and "max_batch_size" are the same without sharding (one GPU or a DDP rank)."""
    T = _seq_len(cfg, seq_len)
    memory = dict(activations=activations, checkpointing=checkpointing, dtype=dtype)
    mem = train_memory(cfg, batch_size, T, **memory, fsdp=fsdp)
    out = {
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg)),
        "batch_size": batch_size, "seq_len": T,
        "params_total": count_params(cfg), "params": {name: n * k for name, _, n, k in param_rows(cfg)},
        "forward_flops_total": forward_flops(cfg, batch_size, T),
        "forward_flops": {label: f for _, label, _, f in forward_flop_rows(cfg, batch_size, T)},
        "train_flops_per_token": train_flops_per_token(cfg, T),
        "activation_checkpointing": checkpointing,
        "recompute_flops_per_token": recompute_flops(cfg, 1, T) / T if checkpointing else 0,
        "adamw_flops_per_step": ADAMW_FLOPS_PER_PARAM * count_params(cfg),
        "train_memory_bytes": train_memory(cfg, batch_size, T, **memory)["total"],
        "train_memory_bytes_per_gpu": mem["total"], "train_memory": mem,
        "dtype": dtype, "activations": activations, "fsdp": fsdp,
        "activation_bytes_per_sequence": (train_memory(cfg, 1, T, **memory)["activations"]
                                          - train_memory(cfg, 0, T, **memory)["activations"]),
    }
    if gpu_mem is not None:
        out["gpu_mem_bytes"] = gpu_mem
        out["max_batch_size"] = max_batch_size(cfg, gpu_mem, T, **memory)
        out["max_batch_per_gpu"] = max_batch_size(cfg, gpu_mem, T, **memory, fsdp=fsdp)
    if steps is not None and gpu is not None and mfu is not None:
        gpus = fsdp or 1  # under FSDP, batch_size is per GPU: each step trains gpus x batch_size sequences
        out.update(steps=steps, gpu=gpu, mfu=mfu, peak_flops=peak_flops(gpu, dtype), num_gpus=gpus,
                   train_flops_total=train_flops(cfg, steps, gpus * batch_size, T, checkpointing),
                   train_days=train_days(cfg, steps, gpus * batch_size, gpu, mfu, dtype, T, checkpointing, gpus))
    return out


def report(cfg, name: str, **options) -> str:
    """The text tables: parameters, forward FLOPs, training FLOPs, memory, time (when steps, gpu and mfu are given).
    options are summary()'s; each table prints figures from summary(), so the text and --json views cannot disagree."""
    s = summary(cfg, **options)
    tables = [f"== {name} ==\n{describe(cfg)}", params_table(cfg, s), forward_flops_table(cfg, s),
              train_flops_table(cfg, s), memory_table(cfg, s)]
    if "train_days" in s:
        tables.append(time_table(s))
    return "\n\n".join(tables) + "\n"


def params_table(cfg, s: dict) -> str:
    N = s["params_total"]
    rows = [[n, shape, f"{per:,}", k, f"{per * k:,}", human(per * k), f"{100 * per * k / N:.1f}%"]
            for n, shape, per, k in param_rows(cfg)]
    rows.append(["total", "", "", "", f"{N:,}", human(N), "100.0%"])
    return "\n".join(["Parameters (weights are (out, in), no biases)",
                      table(["tensor", "shape", "per copy", "copies", "total", "", "share"], rows,
                            right={2, 3, 4, 5, 6}),
                      f"bytes: {human_bytes(FP32_BYTES * N)} in fp32, {human_bytes(BF16_BYTES * N)} in bf16"])


def forward_flops_table(cfg, s: dict) -> str:
    B, T, fwd = s["batch_size"], s["seq_len"], s["forward_flops_total"]
    rows = [[label, formula, f"{f:,}", human(f, "FLOP"), f"{100 * f / fwd:.1f}%"]
            for _, label, formula, f in forward_flop_rows(cfg, B, T)]
    rows.append(["total", "", f"{fwd:,}", human(fwd, "FLOP"), "100.0%"])
    by_id = forward_flops_by_id(cfg, B, T)
    # a causal kernel would compute T(T+1)/2 of the T² dot products in Q Kᵀ and A V
    saved = (by_id["attn_scores"] + by_id["attn_values"]) * (T * T - T * (T + 1) // 2) / (T * T)
    return "\n".join([
        f"Forward FLOPs for B={B} sequences of T={T:,} tokens (2·m·n·p per (m×n)@(n×p) matmul)",
        table(["matmul", "formula", "FLOPs", "", "share"], rows),
        "not counted: RMSNorm, RoPE, softmax, SiLU, residual adds, embedding lookup (element-wise, no matmul).",
        f"causal mask: Q Kᵀ and A V are computed in full and then masked; skipping the masked triangle would save "
        f"{human(saved, 'FLOP')} ({100 * saved / fwd:.1f}% of the total)."])


def train_flops_table(cfg, s: dict) -> str:
    """Training FLOPs per token split into 6·N_matmul + attention, then AdamW's own element-wise FLOPs per step."""
    B, T, N, fwd = s["batch_size"], s["seq_len"], s["params_total"], s["forward_flops_total"]
    per_tok, n_matmul = s["train_flops_per_token"], matmul_params(cfg)
    by_id = forward_flops_by_id(cfg, B, T)
    attn_tok = 3 * (by_id["attn_scores"] + by_id["attn_values"]) / (B * T)  # forward + backward = 3 x forward
    rows = [["forward", "(table above) / (B·T)", human(fwd / (B * T), "FLOP")],
            ["backward", "2 × forward", human(2 * fwd / (B * T), "FLOP")],
            ["training", "3 × forward", human(per_tok, "FLOP")],
            ["  = 6·N_matmul", f"N_matmul = {human(n_matmul)} params used in matmuls", human(6 * n_matmul, "FLOP")],
            ["  + attention", "12·L·T·d (QKᵀ and A V, fwd + bwd)", human(attn_tok, "FLOP")],
            ["6·N (Kaplan rule)", "N = all parameters", human(6 * N, "FLOP")]]
    if s["activation_checkpointing"]:
        rows.append(["+ recomputation", "the blocks' forward again, less w2 (recompute_flops)",
                     human(s["recompute_flops_per_token"], "FLOP")])
    adamw = [[f, n, human(n * N, "FLOP")] for f, n in ADAMW_FLOP_ROWS]
    adamw.append(["AdamW step", ADAMW_FLOPS_PER_PARAM, human(ADAMW_FLOPS_PER_PARAM * N, "FLOP")])
    return "\n".join([
        "Training FLOPs per token (backward = 2 × forward: each matmul's backward is one matmul for the input's",
        "gradient and one for the weight's, each as big as the forward one)",
        table(["", "formula", "FLOPs"], rows),
        f"AdamW's own FLOPs per step, per parameter (vs {human(B * T * per_tok, 'FLOP')} for the model's "
        f"B·T={B * T:,} tokens)", table(["update", "per param", "× N"], adamw)])


ACTIVATIONS_SAID = {"sdpa": "model.py keeps them with the fused sdpa attention (train.py's)",
                    "manual": "model.py keeps them with the from-scratch attention",
                    "handout": "as the handout enumerates them"}


def state_rows(cfg, s: dict) -> list[tuple[str, str, str, int]]:
    """(label, formula, short formula, bytes) of memory besides the activations, for memory_table: the fp32
    training state (sharded under FSDP), the gathered parameters (FSDP) or autocast's weight copies (16-bit)."""
    mem, n, nb, na = s["train_memory"], s["fsdp"], FP32_BYTES, ACTIVATION_BYTES[s["dtype"]]
    per = "N" if n is None else f"N/{n}"  # under FSDP: rank 0's shard, ceil(dim0 / N) rows of each parameter
    all_state = f"{sum(TRAIN_STATE_COPIES.values()) * nb}·{per}"  # the short formula of the three rows together
    rows = [("parameters", f"{nb}·{per}", all_state, mem["params"]), ("gradients", f"{nb}·{per}", "", mem["grads"]),
            ("AdamW m and v", f"{TRAIN_STATE_COPIES['adamw_state']} · {nb}·{per}", "", mem["adamw_state"])]
    if mem["gathered"]:
        units = fsdp_unit_params(cfg)
        rows.append((f"gathered: root unit ({human(units['root'])}) + one block ({human(units['block'])})",
                     f"{na}·(root + block)", f"{na}·(root + block)", mem["gathered"]))
    if mem["autocast_weights"]:
        formula = f"{na}·(V·d + one block's)" if s["activation_checkpointing"] else f"{na}·N_matmul"
        rows.append((f"autocast's {s['dtype']} weight copies", formula, formula, mem["autocast_weights"]))
    return rows


def memory_table(cfg, s: dict) -> str:
    B, T, mem, dtype, n = s["batch_size"], s["seq_len"], s["train_memory"], s["dtype"], s["fsdp"]
    per_seq, na = s["activation_bytes_per_sequence"], ACTIVATION_BYTES[dtype]
    fixed = mem["total"] - B * per_seq  # all but the activations that grow with B
    state = state_rows(cfg, s)
    rows = [[label, formula, human_bytes(b)] for label, formula, _, b in state]
    rows += [[f"act: {label}", times(na, formula), human_bytes(na * e)]
             for _, label, formula, e in activation_memory_rows(cfg, B, T, s["activations"],
                                                                s["activation_checkpointing"])]
    rows.append(["total", "", human_bytes(mem["total"])])
    fixed_parts = [short for _, _, short, _ in state if short]
    if fixed != sum(b for *_, b in state):
        fixed_parts.append("RoPE rotations")
    precision = (f"in fp32 ({FP32_BYTES} bytes per number)" if na == FP32_BYTES else
                 f"with {dtype} mixed precision (fp32 weights, gradients and AdamW state; activations {na} bytes each)")
    where = "one GPU (or each DDP rank)" if n is None else f"each of {n} GPUs under FSDP2"
    checkpointing = (", with activation checkpointing (block inputs kept, one block recomputed at a time)"
                     if s["activation_checkpointing"] else "")
    out = [f"Memory for AdamW training {precision} on {where}, B={B}{'' if n is None else ' per GPU'}, T={T:,}; "
           f"activations {ACTIVATIONS_SAID[s['activations']]} (--activations {s['activations']}){checkpointing}",
           table(["", "formula", f"B={B}"], rows),
           f"total(B) = {' + '.join(fixed_parts)} + B · {per_seq:,} bytes = {human_bytes(fixed)} + B · "
           f"{human_bytes(per_seq)}"]
    if "max_batch_per_gpu" in s:
        b = s["max_batch_per_gpu"]
        out.append(f"largest batch in {human_bytes(s['gpu_mem_bytes'])}: B = {b}"
                   + ("" if b else " (parameters, gradients and AdamW state alone do not fit)"))
    return "\n".join(out)


def time_table(s: dict) -> str:
    n = s["num_gpus"]
    where = f"one {s['gpu']}" if n == 1 else f"{n} × {s['gpu']} (B={s['batch_size']} per GPU)"
    B = "B·T" if n == 1 else f"{n}·B·T"
    return "\n".join([
        f"Time: {s['steps']:,} steps × {'B=' if n == 1 else f'{n}·B='}{n * s['batch_size']} × T={s['seq_len']:,} "
        f"tokens on {where} at "
        f"{100 * s['mfu']:g}% MFU, {s['dtype']} (peak {human(s['peak_flops'], 'FLOP/s')})",
        f"  FLOPs = steps · ({B} · {human(s['train_flops_per_token'], 'FLOP')}"
        + (f" + {B} · {human(s['recompute_flops_per_token'], 'FLOP')} recomputed" if s["activation_checkpointing"]
           else "") + f" + {ADAMW_FLOPS_PER_PARAM}·N) = {human(s['train_flops_total'], 'FLOP')}",
        f"  time  = FLOPs / ({'' if n == 1 else f'{n} · '}MFU · peak) = {human_days(s['train_days'])}"])


def memory_flags(activations: str = DEFAULT_ACTIVATIONS, checkpointing: bool = False, dtype: str = "fp32",
                 fsdp: int | None = None) -> str:
    """train_memory's keywords as the command-line flags that give them: '--activations sdpa --dtype bf16'."""
    return " ".join([f"--activations {activations}", f"--dtype {dtype}"] + (["--activation-checkpointing"] if
                    checkpointing else []) + ([f"--fsdp {fsdp}"] if fsdp is not None else []))


def compare(configs: dict, seq_len: int | None = None, **memory) -> str:
    """Presets side by side at B=1, T=context_length (or seq_len): how shares move with size and context;
    memory: train_memory's keywords (activations, checkpointing, dtype, fsdp)."""
    rows = []
    for name, cfg in configs.items():
        T = _seq_len(cfg, seq_len)
        f = forward_flops_by_id(cfg, 1, T)
        tot = sum(f.values())
        attn = f["attn_scores"] + f["attn_values"]
        proj = f["qkv"] + f["out_proj"]
        rows.append([name, f"{T:,}", human(count_params(cfg)), human(tot, "FLOP"), f"{100 * proj / tot:.1f}%",
                     f"{100 * attn / tot:.1f}%", f"{100 * f['ffn'] / tot:.1f}%", f"{100 * f['lm_head'] / tot:.1f}%",
                     human(train_flops_per_token(cfg, T), "FLOP"),
                     human_bytes(train_memory(cfg, 1, T, **memory)["total"])])
    return (f"Presets side by side: one sequence (B=1) of T tokens; shares of forward FLOPs; memory (per GPU) "
            f"{memory_flags(**memory)}\n"
            + table(["preset", "T", "params", "forward", "QKV+out", "QKᵀ+AV", "FFN", "LM head", "train/token",
                     "memory B=1"], rows))


FSDP_TABLE_PRESETS = tuple(GPT2_SHAPES)  # gpt2-small .. gpt2-xl
FSDP_TABLE_GPU_MEM, FSDP_TABLE_GPUS = 80e9, 8  # one 80 GB GPU (A100/H100 80GB), FSDP over one 8-GPU node


def fsdp_table(gpu_mem: float = FSDP_TABLE_GPU_MEM, world_size: int = FSDP_TABLE_GPUS, batch_size: int = 8,
               seq_len: int | None = None, dtype: str = "bf16", activations: str = DEFAULT_ACTIVATIONS) -> str:
    """--fsdp-table: the GPT-2 family on gpu_mem GPUs, DDP (every GPU holds everything) vs FSDP2 over world_size,
    each with and without activation checkpointing: memory per GPU at batch_size sequences per GPU, and the largest
    batch per GPU that fits. A Markdown table (EXPERIMENTS.md quotes it)."""
    setups = [("DDP", None, False), ("DDP + AC", None, True), (f"FSDP×{world_size}", world_size, False),
              (f"FSDP×{world_size} + AC", world_size, True)]
    header = ["preset", "params"] + [f"{name}: {part}" for name, *_ in setups for part in (f"GB/GPU at B={batch_size}",
                                                                                         "max B")]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in FSDP_TABLE_PRESETS:
        cfg = presets()[name]
        cells = [name, human(count_params(cfg))]
        for _, fsdp, checkpointing in setups:
            memory = dict(activations=activations, checkpointing=checkpointing, dtype=dtype, fsdp=fsdp)
            total = train_memory(cfg, batch_size, seq_len, **memory)["total"]
            cells += [f"{total / 1e9:.1f}", f"{max_batch_size(cfg, gpu_mem, seq_len, **memory):,}"]
        lines.append("| " + " | ".join(cells) + " |")
    T = "context_length 1,024" if seq_len is None else f"T={seq_len:,}"
    return "\n".join([f"GPT-2 family, AdamW, {T}, {dtype} ({memory_flags(activations, dtype=dtype)}), one "
                      f"{human_bytes(gpu_mem)} GPU: DDP vs FSDP2 over {world_size}, with and without activation "
                      f"checkpointing (AC); GB = 1e9 bytes; max B = largest batch per GPU in {human_bytes(gpu_mem)}",
                      "", *lines])


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

MEASURE_MAX_BYTES = 4e9  # --measure runs the model on this machine's CPU: refuse what a laptop could not hold


MODEL_SIZE_FLAGS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="accounting.py",
                           description="Parameters, FLOPs, memory and training time of a Transformer LM "
                                       "(CS336 assignment 1, transformer_accounting and adamwAccounting).")
    parser.add_argument("--preset", default="gpt2-xl", help="one of the presets (default gpt2-xl); see --compare")
    for field in MODEL_SIZE_FLAGS:
        parser.add_argument("--" + field.replace("_", "-"), type=positive_int, help=f"override the preset's {field}")
    parser.add_argument("--rope-theta", type=float)
    parser.add_argument("--norm", choices=model.NORMS, help="where the RMSNorms go (none: no RMSNorm at all)")
    parser.add_argument("--position", choices=model.POSITIONS, help="RoPE or no position information (NoPE)")
    parser.add_argument("--ffn", choices=model.FFNS, help="silu without --d-ff uses d_ff = 4*d_model")
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="sequences per step B (default 1)")
    parser.add_argument("--seq-len", type=positive_int, help="tokens per sequence T (default: context_length)")
    parser.add_argument("--activations", choices=ACTIVATIONS, default=DEFAULT_ACTIVATIONS,
                        help="which activations memory counts: sdpa (model.py with the fused attention train.py runs; "
                             "default), manual (model.py's from-scratch attention, T x T matrices kept), handout (the "
                             "handout's enumeration)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="torch.utils.checkpoint around each block: memory keeps block inputs (plus one block "
                             "recomputed at a time), time adds the recomputation")
    parser.add_argument("--fsdp", type=positive_int, metavar="N",
                        help="FSDP2 over N GPUs: memory per GPU with parameters, gradients and AdamW state sharded "
                             "N ways (--batch-size is then per GPU)")
    parser.add_argument("--gpu-mem", type=parse_bytes, help="GPU memory, e.g. 80GB: print the largest batch")
    parser.add_argument("--steps", type=positive_int, help="training steps, for the time estimate")
    parser.add_argument("--gpu", type=str.lower, help=f"accelerator for the time estimate: {', '.join(PEAK_FLOPS)}")
    parser.add_argument("--mfu", type=float, help="model FLOPs utilisation in (0, 1], e.g. 0.5")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="fp32",
                        help="what the matmuls compute in (default fp32): the published peak the time estimate uses, "
                             "and the activations' bytes (bf16/fp16: 2, mixed precision; weights, gradients and "
                             "AdamW state stay fp32)")
    parser.add_argument("--compare", action="store_true", help="all presets side by side")
    parser.add_argument("--fsdp-table", action="store_true",
                        help="the GPT-2 family, DDP vs FSDP2 (over --fsdp GPUs, default 8) with and without "
                             "activation checkpointing: memory per GPU at --batch-size, largest batch in --gpu-mem "
                             "(default 80GB); a Markdown table")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--measure", action="store_true",
                        help="run the model on CPU and compare saved activations with the formula (small configs)")
    return parser


def resolve_config(args) -> model.ModelConfig:
    """The --preset with the model flags applied; ValueError (one line) for an unknown preset or a bad config.
    ModelConfig.with_overrides skips absent (None) flags and owns the SiLU ablation's d_ff = 4·d_model rule."""
    all_presets = presets()
    if args.preset not in all_presets:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {', '.join(all_presets)}")
    return all_presets[args.preset].with_overrides(
        **{field: getattr(args, field) for field in MODEL_SIZE_FLAGS}, rope_theta=args.rope_theta, norm=args.norm,
        position=args.position, ffn=args.ffn, tie_embeddings=args.tie_embeddings or None)


def check_args(args, cfg) -> None:
    """ValueError (one line) for flags that do not fit together or with cfg."""
    if args.seq_len is not None and args.seq_len > cfg.context_length:
        raise ValueError(f"--seq-len {args.seq_len} exceeds context_length {cfg.context_length}")
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.gpu is not None:  # before the check below: a misspelt GPU is the problem to name, not --steps
        peak_flops(args.gpu, args.dtype)
    timed = {"--steps": args.steps, "--gpu": args.gpu, "--mfu": args.mfu}
    missing = [flag for flag, value in timed.items() if value is None]
    if 0 < len(missing) < len(timed):
        raise ValueError(f"the time estimate needs --steps, --gpu and --mfu together; add {' and '.join(missing)} "
                         "(e.g. --steps 400000 --gpu a100 --mfu 0.5)")
    if args.measure:
        need = train_memory(cfg, args.batch_size, _seq_len(cfg, args.seq_len))["total"]  # bound: no AdamW runs
        if need > MEASURE_MAX_BYTES:
            raise ValueError(f"--measure runs the model on CPU and would need ~{human_bytes(need)}; "
                             "pick a small config (e.g. --preset tiny)")


# What each mode other than the single-preset tables ignores: given with it, a flag would be dropped silently (the
# user believes, say, that --compare used their --d-model), so check_mode_flags refuses it instead.
MODEL_FLAGS = ("preset", *MODEL_SIZE_FLAGS, "rope_theta", "norm", "position", "ffn", "tie_embeddings")
TIME_FLAGS = ("steps", "gpu", "mfu")
MODE_IGNORES = {  # mode -> (what it prints, the flags it does not read)
    "fsdp_table": ("its own Markdown table (the GPT-2 family, with and without checkpointing)",
                   ("measure", "compare", "json", "activation_checkpointing", *MODEL_FLAGS, *TIME_FLAGS)),
    "measure": ("the activations of one CPU run of the model",
                ("compare", "json", "fsdp", "activations", "gpu_mem", *TIME_FLAGS)),
    "compare": ("every preset at its own size and context length",
                (*MODEL_FLAGS, "seq_len", "gpu_mem", *TIME_FLAGS)),
}


def check_mode_flags(args, parser) -> None:
    """ValueError naming the flags that --fsdp-table, --measure or --compare would ignore (a flag counts as given
    when its value is not the parser's default)."""
    for mode, (prints, ignored) in MODE_IGNORES.items():
        if not getattr(args, mode):
            continue
        given = ["--" + f.replace("_", "-") for f in ignored if getattr(args, f) != parser.get_default(f)]
        if given:
            raise ValueError(f"--{mode.replace('_', '-')} prints {prints} and does not use {', '.join(given)}; "
                             f"drop {'it' if len(given) == 1 else 'them'}")


def memory_args(args) -> dict:
    """The flags that shape memory, as train_memory's (and summary's) keywords."""
    return dict(activations=args.activations, checkpointing=args.activation_checkpointing, dtype=args.dtype,
                fsdp=args.fsdp)


def output(args, cfg) -> str:
    """What the command prints: --measure's comparison, --compare's table (or JSON), or cfg's tables (or JSON)."""
    T = _seq_len(cfg, args.seq_len)
    if args.fsdp_table:
        return fsdp_table(args.gpu_mem or FSDP_TABLE_GPU_MEM, args.fsdp or FSDP_TABLE_GPUS, args.batch_size,
                          args.seq_len, args.dtype, args.activations)
    if args.measure:  # runs the model: the measuring code lives in the package (it imports this file)
        from lib import measure
        return measure.measure_report(cfg, args.batch_size, T, args.activation_checkpointing, args.dtype)
    if args.compare:
        if args.json:
            return json.dumps({"presets": {n: summary(c, args.batch_size, **memory_args(args))
                                           for n, c in presets().items()}}, indent=1)
        return compare(presets(), **memory_args(args))
    kwargs = dict(batch_size=args.batch_size, seq_len=T, gpu_mem=args.gpu_mem, steps=args.steps, gpu=args.gpu,
                  mfu=args.mfu, **memory_args(args))
    if args.json:
        return json.dumps({"preset": args.preset, **summary(cfg, **kwargs)}, indent=1)
    return report(cfg, args.preset, **kwargs)


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_mode_flags(args, parser)  # first: a flag the mode ignores is the problem, whatever its value
        cfg = resolve_config(args)
        check_args(args, cfg)
    except ValueError as e:
        parser.error(str(e))  # one line, exit code 2
    print(output(args, cfg))


if __name__ == "__main__":
    main()
