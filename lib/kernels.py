"""kernels.py: model.py's fast path, chosen with `TransformerLM(..., fast=True)` (what the programs run).

Each function here computes what one readable piece of model.py computes, with fewer passes over memory, fewer
op launches or a fused kernel: the embedding as index_select, RMSNorm and the SwiGLU gate with their gradients
written out (torch.autograd.Function), SiLU as torch's one-kernel F.silu, RoPE as one complex multiply, and
attention as F.scaled_dot_product_attention (flash attention on GPU and CPU). tests/test_kernels.py holds each one
equal to its readable twin, values and gradients, and the whole fast model equal to the plain one.

Under torch.compile each kernel falls back to the readable ops (torch.compile fuses them itself, and cannot trace
a complex multiply or needs not see our hand-written backward).

Lower floor of lib/: this file imports no chapter; model.py passes in what it needs (tensors, eps, tables, and for
attention its RoPE module, KV cache and causal_mask function, called but never imported).

Shape legend as model.py's: B batch, T query length, S key length, C d_model, H heads, D head dim, F d_ff.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for a 16-bit float dtype, else the dtype itself (fp32, float64)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Embedding


def embedding(weight: Tensor, token_ids: Tensor) -> Tensor:
    """weight[token_ids], (B, T) -> (B, T, C), gathered as index_select of the flattened ids. note: the same rows,
    but index_select's backward is one index_add_, where indexing's is an accumulating index_put_ (slower on CPU)."""
    return weight.index_select(0, token_ids.reshape(-1)).view(*token_ids.shape, -1)


# --------------------------------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.RMSNorm's x / RMS(x) * g, computed in fp32 (or float64) and cast back to x's dtype, as _RMSNormFunction.
    (Under torch.compile model.RMSNorm runs its readable lines instead: compile fuses them.)"""
    return _RMSNormFunction.apply(x, weight, eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its gradient written out, so that backward is 6 passes over (..., C) instead of the ~17 ops
    autograd records for the readable formula. At small sizes every op costs a fixed overhead, and on CPU a fresh
    (..., C) tensor costs more again than one written in place (its memory is not in cache): so forward allocates
    one tensor and backward two, and the two sums over a row or a column are matrix-vector products (one BLAS pass
    each). It keeps the fp32 input x and r = 1 / RMS(x) for backward: for an fp32 input that is the tensor itself,
    no copy (accounting.saved_activations). tests/test_kernels.py checks values and gradients against the formula.

    The gradient, with r = (mean(x²) + eps)^(-1/2) per row, x̂ = x·r and y = x̂ ⊙ g:
        dL/dg = Σ over rows of dy ⊙ x̂ = Σ over rows of r · (dy ⊙ x)
        dL/dx = r · (dx̂ - x̂ · mean(dx̂ ⊙ x̂)) = r · dy ⊙ g - x · r³ · Σ_c (dy ⊙ x)_c g_c / C,  dx̂ = dy ⊙ g
    (∂r/∂x_j = -r³·x_j / C, so dL/dx_j = r·dx̂_j - r³·x_j·Σ_i dx̂_i·x_i / C, which is the second line)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        in_dtype, x = x.dtype, x.to(_at_least_fp32(x.dtype))  # (..., C)
        # ||x||² / C = mean(x²): one reduction kernel, then cheap ops on the (..., 1) result
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r, weight)
        ctx.in_dtype = in_dtype
        return (x * r).mul_(weight.to(x.dtype)).to(in_dtype)  # (..., C) * (..., 1), then * (C,) in place

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, r, weight = ctx.saved_tensors
        C, g = x.shape[-1], weight.to(x.dtype)
        dy = dy.to(x.dtype)  # (..., C)
        dy_x = (dy * x).reshape(-1, C)  # (N, C), N = rows
        # note: the two sums as torch.mv, a matrix-vector product (not `@`, which would run a 1-row matrix product).
        # They are O(N·C) reductions like the rest of the norm: neither accounting.py nor torch's FLOP counter
        # counts them among the matmuls.
        d_weight = torch.mv(dy_x.T, r.reshape(-1))  # (C, N) @ (N,) -> (C,): Σ over rows of r · dy ⊙ x
        # -r³ · Σ_c (dy ⊙ x)_c g_c / C, (..., 1); then dx = (dy ⊙ g) · r + x · that, in place after the first pass
        coef = torch.mv(dy_x, g).reshape(r.shape).mul_(r.pow(3)).div_(-C)  # (N, C) @ (C,) -> (N,) -> (..., 1)
        d_x = (dy * g).mul_(r).addcmul_(x, coef)
        return d_x.to(ctx.in_dtype), d_weight.to(weight.dtype), None


# --------------------------------------------------------------------------------------------------------------------
# SiLU and the SwiGLU gate


def silu(x: Tensor) -> Tensor:
    """x · σ(x) as torch's one kernel: one pass forward and one backward (silu_backward), where x * sigmoid(x) is
    sigmoid + mul forward and sigmoid_backward + 2 muls backward."""
    return F.silu(x)


def swiglu_gate(a: Tensor, b: Tensor) -> Tensor:
    """SiLU(a) ⊙ b, (B, T, F) each, as _SwiGLUGate; under torch.compile (or for mixed dtypes) `F.silu(a) * b`."""
    if torch.compiler.is_compiling() or a.dtype != b.dtype:  # the readable product (torch.compile fuses it)
        return F.silu(a) * b
    return _SwiGLUGate.apply(a, b)


class _SwiGLUGate(torch.autograd.Function):
    """SiLU(a) ⊙ b, as `F.silu(a) * b` computes it, with the gradient written out:
        dL/db = dh ⊙ SiLU(a),  dL/da = dh ⊙ b ⊙ SiLU'(a)   (silu_backward computes the second from dh ⊙ b and a).
    Autograd of `F.silu(a) * b` keeps a, SiLU(a) and b; this keeps a and b only and computes SiLU(a) again in
    backward (one cheap pass), so the FFN keeps 3 (B, T, F) tensors instead of 4 (accounting.saved_activations),
    and it writes SiLU(a) ⊙ b and silu_backward's result in place: on CPU a fresh (B, T, F) tensor costs more than
    the pass that fills it (its memory is not in cache). tests/test_kernels.py checks values and gradients against
    `F.silu(a) * b`."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a).mul_(b)  # (B, T, F)

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, b = ctx.saved_tensors
        d_b = F.silu(a).mul_(dh)  # (B, T, F)
        d_a = dh * b
        torch.ops.aten.silu_backward.grad_input(d_a, a, grad_input=d_a)  # d_a ⊙ SiLU'(a), in place
        return d_a, d_b


# --------------------------------------------------------------------------------------------------------------------
# RoPE


def rope(x: Tensor, token_positions: Tensor, rotations: Tensor, dtype: torch.dtype) -> Tensor:
    """model.RotaryPositionalEmbedding's rotation of adjacent pairs, x (..., T, D) -> (..., T, D) in `dtype`, as one
    complex multiply (RoFormer §3.4.2; Meta's Llama code): a pair (x0, x1) is the number x0 + i·x1, and rotating it
    by an angle is multiplying by e^(i·angle).

    Why faster on CPU: one kernel forward and one backward, where the readable lines are a flip copy, two broadcast
    multiplies and an add (each a pass over q or k), and the same again in backward. Computed in fp32 (there is no
    bf16 complex type) and cast to `dtype`. The factors are one lookup in the `rotations` table, (max_seq_len, D/2,
    2) = (cos, sin) pairs, which view_as_complex reads as complex numbers without a copy (building them from the cos
    and sin rows took five ops). (Under torch.compile, which cannot generate complex ops, model.py runs its readable
    rotation instead.)"""
    rotation = torch.view_as_complex(rotations.float())[token_positions]  # (..., T, D/2): e^(i·angle)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, D/2, 2) -> (..., T, D/2) complex
    rotated = pairs * rotation  # (..., T, D/2) * (..., T, D/2): each pair turned by its angle
    return torch.view_as_real(rotated).flatten(-2).to(dtype)  # (..., T, D/2, 2) -> (..., T, D)


# --------------------------------------------------------------------------------------------------------------------
# Attention


CPU_FP32_ATTENTION_MAX_HEAD_DIM = 64  # see fused_attention


def attention(q: Tensor, k: Tensor, v: Tensor, rope, token_positions: Tensor | None, kv_cache, layer_idx: int,
              causal_mask) -> Tensor:
    """model.CausalMultiHeadSelfAttention's steps between the projections and output_proj, with the fused kernel:
    q, k, v (B, T, H, D) -> the heads concatenated, (B, T, C). rope: the layer's RotaryPositionalEmbedding or None;
    kv_cache: a model.KVCache or None (its append(layer_idx, k, v) is called); causal_mask: model.causal_mask.

    note: where fused_attention computes in fp32 (16-bit activations on CPU, small heads), RoPE, itself in fp32,
    hands q and k over in fp32 instead of rounding them to bf16 for attention to cast straight back (4 casts fewer
    per layer forward and 4 backward). Decoding keeps its cache in the activations' dtype."""
    T = q.shape[1]
    if rope is not None:
        # note: rotate before moving the heads forward, while q and k are still contiguous (faster element-wise
        # ops); the positions get a trailing 1 to broadcast over the heads: (T,) -> (T, 1), (B, T) -> (B, T, 1).
        rope_dtype = attention_dtype(q) if kv_cache is None else q.dtype
        q = rope(q, token_positions[..., None], rope_dtype)  # (B, T, H, D)
        k = rope(k, token_positions[..., None], rope_dtype)  # (B, T, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if kv_cache is not None:
        k, v = kv_cache.append(layer_idx, k, v)  # (B, H, S, D) each, S = cached + T
    S = k.shape[-2]
    if S == T:
        out = fused_attention(q, k, v, is_causal=True)  # is_causal builds the lower triangle itself
    elif T == 1:  # one new token is the last position: it may attend to every cached key, so no mask at all
        out = fused_attention(q, k, v)  # (B, H, 1, D)
    else:  # several new tokens after a cache: the bottom-right-aligned triangle (model.causal_mask); is_causal
        # would align it top-left
        out = fused_attention(q, k, v, attn_mask=causal_mask(T, S, q.device))  # (B, H, T, D)
    return out.transpose(1, 2).reshape(out.shape[0], T, -1)  # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention (flash attention on GPU and CPU), the same softmax(Q Kᵀ / sqrt(D)) V as
    model.scaled_dot_product_attention; kwargs are its attn_mask / is_causal. The result has v's dtype.

    note: on CPU in bf16 or fp16 with a head dim of at most 64, it computes in fp32 and rounds the result back:
    torch's 16-bit CPU kernel is slower there than its fp32 one, backward most of all; at head dim 128 the bf16
    kernel wins. More precise, never less. q and k may then arrive in fp32 already (attention's RoPE hands them
    over so)."""
    if attention_dtype(v) != v.dtype:
        with torch.autocast("cpu", enabled=False):  # else autocast would cast the fp32 inputs straight back
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention_dtype(x: Tensor) -> torch.dtype:
    """The dtype fused_attention computes in for activations like x (..., D): fp32 for bf16 or fp16 on CPU with a
    head dim D of at most 64 (see there), else x's own."""
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[-1] <= CPU_FP32_ATTENTION_MAX_HEAD_DIM):
        return torch.float32
    return x.dtype
