"""The Llama-style Transformer language model of CS336 assignment 1 (handout §3), from scratch.

Built bottom-up from nothing but `nn.Parameter` and container modules, in the order data flows through it:
Linear → Embedding → RMSNorm → SwiGLU (SiLU) → softmax → attention → RoPE → KV cache and causal mask → multi-head
self-attention → block → LM, then the config and a small CLI. That readable code is what runs by default.
`TransformerLM(..., fast=True)` (what train.py, sample.py and the benchmarks build) swaps in lib/kernels.py piece by
piece, one visible `if self.fast:` line each: torch's fused attention kernel, hand-written backward passes, RoPE as
one complex multiply. tests/test_kernels.py holds the two paths equal, values and gradients.

    python model.py                          # parameter counts of the presets and a forward pass on random ids
    python model.py --preset ts17m --norm post --position nope
    python -m pytest tests/test_model.py

Layers: bpe -> model, optim -> accounting -> train -> sample; model.py needs only lib/ (its `main` borrows
optim.cross_entropy to print the loss at init). The Hugging Face Llama mapping of this model is lib/hf_llama.py.

Shape legend: B batch, T sequence (query) length, S key length (cached + new), C d_model, H heads, D head dim
(C / H), V vocab, F d_ff.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from lib import kernels
from lib.cli import OneLineParser


# --------------------------------------------------------------------------------------------------------------------
# Linear and Embedding (handout §3.4.2, §3.4.3)


class Linear(nn.Module):
    """y = x W^T with no bias; weight is (out, in), the PyTorch and CS336 convention."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        # Init (handout §3.4.1): N(0, σ² = 2 / (d_in + d_out)) truncated at ±3σ (Glorot-style variance preservation).
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (..., in) @ (in, out) -> (..., out)


class Embedding(nn.Module):
    """Row lookup: token id i -> weight[i]; weight is (V, C)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None, *, fast: bool = False):
        super().__init__()
        self.fast = fast
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        # Init (handout §3.4.1): N(0, 1) truncated at ±3.
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        if self.fast:  # lib/kernels.py: index_select, whose backward is one index_add_ (indexing's: index_put_)
            return kernels.embedding(self.weight, token_ids)
        return self.weight[token_ids]  # (B, T) -> (B, T, C): the rows of the ids


# --------------------------------------------------------------------------------------------------------------------
# RMSNorm (Zhang & Sennrich 2019; handout §3.5.1)


RMS_NORM_EPS = 1e-5  # the handout's ε (and Llama 2/3's rms_norm_eps): keeps 1/RMS finite for an all-zero input


class RMSNorm(nn.Module):
    """x / RMS(x) * g, with RMS(x) = sqrt(mean(x²) + eps) over the last dim; g is the learned gain."""

    def __init__(self, d_model: int, eps: float = RMS_NORM_EPS, device=None, dtype=None, *, fast: bool = False):
        super().__init__()
        self.eps = eps
        self.fast = fast
        # Init: g = 1, so the layer starts as a pure normalisation.
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # lib/kernels.py: the gradient written out, 6 passes over (..., C) for autograd's ~17 ops (torch.compile
        # fuses the readable lines below instead: it need not see our backward)
        if self.fast and not torch.compiler.is_compiling():
            return kernels.rms_norm(x, self.weight, self.eps)
        # note: squaring in bf16/fp16 overflows or loses precision, so compute in fp32 (float64 stays) and cast back.
        in_dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))
        inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C) -> (..., 1)
        return (x * inv_rms * self.weight.to(x.dtype)).to(in_dtype)  # (..., C) * (..., 1) * (C,) -> (..., C)


class NoNorm(nn.Module):
    """The norm="none" ablation: the identity, with no parameters (so no ln*.weight keys in the state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU (Shazeer 2020; handout §3.5.2) and the plain SiLU ablation


def silu(x: Tensor) -> Tensor:
    """SiLU / Swish (Elfwing et al. 2017): x · σ(x)."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) ⊙ W3 x); w1, w3 are (F, C), w2 is (C, F)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *, fast: bool = False):
        super().__init__()
        self.fast = fast
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w1(x), self.w3(x)  # (B, T, C) -> (B, T, F) each
        if self.fast:  # lib/kernels.py: the gate's gradient written out, SiLU(a) recomputed: 3 saved tensors, not 4
            return self.w2(kernels.swiglu_gate(a, b))  # (B, T, F) -> (B, T, C)
        return self.w2(silu(a) * b)  # (B, T, F) -> (B, T, C)


class SiLUFFN(nn.Module):
    """The ffn="silu" ablation: FFN(x) = W2 SiLU(W1 x), two matrices (no gate w3); d_ff is usually 4·d_model."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *, fast: bool = False):
        super().__init__()
        self.fast = fast
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w1(x)  # (B, T, C) -> (B, T, F)
        if self.fast:  # lib/kernels.py: torch's one-kernel SiLU, one pass forward and one backward
            return self.w2(kernels.silu(h))  # (B, T, F) -> (B, T, C)
        return self.w2(silu(h))  # (B, T, F) -> (B, T, C)


# --------------------------------------------------------------------------------------------------------------------
# Softmax and scaled dot-product attention (handout §3.5.4)


def softmax(x: Tensor, dim: int) -> Tensor:
    """exp(x_i) / Σ_j exp(x_j) along `dim`.

    Subtracting the max first changes nothing mathematically (it cancels) but keeps exp() ≤ 1, so huge logits do
    not overflow to inf (and inf/inf = NaN). A row that is all -inf (fully masked) still gives NaN.
    """
    x = x - x.amax(dim=dim, keepdim=True)
    e = torch.exp(x)
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q Kᵀ / sqrt(D)) V for any leading batch dims (Vaswani et al. 2017, eq. 1).

    Q (..., T, D), K (..., S, D), V (..., S, Dv); mask (T, S) or broadcastable to (..., T, S), boolean,
    True = may attend. Returns (..., T, Dv).
    """
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., T, D) @ (..., D, S) -> (..., T, S)
    if mask is not None:
        # -inf, not a large negative number: exp(-inf) is exactly 0, so masked keys get exactly zero weight.
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V  # (..., T, S) @ (..., S, Dv) -> (..., T, Dv)


# --------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, RoFormer; handout §3.5.3)


class RotaryPositionalEmbedding(nn.Module):
    """Rotates each adjacent pair (x[2k], x[2k+1]) of a query/key vector at position i by the angle i · θ^(-2k/D).

    note: adjacent pairs, as in the handout and the RoFormer paper; Llama/HF's code rotates the two halves
    (x[k], x[k + D/2]) instead — the same idea with a permuted head dim, so the weights are not interchangeable.
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None, *, fast: bool = False):
        super().__init__()
        self.fast = fast
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float32) / d_k)  # (D/2,): θ^(-2k/D)
        positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)  # (max_seq_len,)
        angles = torch.outer(positions, inv_freq)  # (max_seq_len, D/2): angle of pair k at position i
        # Each angle serves both members of its pair: cos as (c0, c0, c1, c1, ...), sin signed as (-s0, s0, -s1, s1,
        # ...), so that forward is two full-width multiplies (see there).
        cos = torch.cos(angles).repeat_interleave(2, dim=-1)  # (max_seq_len, D)
        sin = torch.stack((-torch.sin(angles), torch.sin(angles)), dim=-1).flatten(-2)  # (.., D/2, 2) -> (.., D)
        # Non-persistent buffers: they follow .to(device) but are derived, so they stay out of the state dict.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # The fast path's table (kernels.rope): e^(i·angle) as (cos, sin) pairs, read as complex numbers without a
        # copy. note: a real buffer, as a complex one would be cast to real by model.to(dtype).
        self.register_buffer("rotations", torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1),
                             persistent=False)  # (max_seq_len, D/2, 2)

    def forward(self, x: Tensor, token_positions: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """x (..., T, D), token_positions (..., T) ints, broadcastable to x.shape[:-1] -> (..., T, D); the result
        in `dtype`, by default x's."""
        # lib/kernels.py: the rotation as one complex multiply, one kernel forward and one backward (torch.compile,
        # which cannot generate complex ops, fuses the readable lines below instead)
        if self.fast and not torch.compiler.is_compiling():
            return kernels.rope(x, token_positions, self.rotations, dtype or x.dtype)
        # subtle: the cache is fp32; cast to x's dtype so bf16 activations stay bf16 (HF Llama does the same).
        cos = self.cos[token_positions].to(x.dtype)  # (..., T, D): (c0, c0, c1, c1, ...)
        sin = self.sin[token_positions].to(x.dtype)  # (..., T, D): (-s0, s0, -s1, s1, ...)
        # The 2-D rotation of each pair: (x0, x1) -> (c·x0 - s·x1, s·x0 + c·x1) = c·(x0, x1) + s·(-x1, x0).
        # Swapping each pair gives (x1, x0, x3, x2, ...); the signed sin supplies the minus.
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., T, D/2, 2) -> pairs swapped -> (..., T, D)
        return (x * cos + swapped * sin).to(dtype or x.dtype)  # (..., T, D)


# --------------------------------------------------------------------------------------------------------------------
# KV cache (the keys and values of the positions already seen, for decoding in sample.py) and the causal mask


class KVCache:
    """Per-layer keys (after RoPE) and values of positions 0 .. seq_len-1, for one batch of sequences.

    Usage: `cache = KVCache(); logits = lm(prompt_ids, kv_cache=cache); logits = lm(next_ids, kv_cache=cache)`.
    TransformerLM.forward places new tokens at positions seq_len .. seq_len+T_new-1 and advances seq_len; each
    attention layer appends its new keys/values with `append`. The cache is not a module and holds no parameters;
    start a fresh one to reset (e.g. when the window is full).
    """

    def __init__(self):
        self.keys: list[Tensor] = []  # per layer: (B, H, seq_len, D), RoPE already applied (views of the buffers)
        self.values: list[Tensor] = []  # per layer: (B, H, seq_len, D)
        self.buffers: list[tuple[Tensor, Tensor]] = []  # per layer: key and value storage, (B, H, capacity, D)
        self.seq_len = 0  # positions cached so far (advanced by TransformerLM.forward after all layers ran)

    def append(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this layer's new (B, H, T_new, D) keys and values; return all of them, (B, H, S, D) each.

        note: appending with torch.cat would copy the whole cache on every decoded token (O(S) per token, a step
        time that grows with the sequence). Instead the keys/values live in buffers whose capacity doubles when
        full, so a token costs one (B, H, 1, D) write and, amortised, O(1) copying.
        """
        if layer_idx == len(self.buffers):  # the first call for this layer: empty views of the right shape
            self.buffers.append((k[..., :0, :], v[..., :0, :]))
            self.keys.append(k[..., :0, :])
            self.values.append(v[..., :0, :])
        old_len, (k_buf, v_buf) = self.keys[layer_idx].shape[-2], self.buffers[layer_idx]
        new_len = old_len + k.shape[-2]
        if new_len > k_buf.shape[-2]:  # full: move to buffers of twice the size
            capacity = max(new_len, 2 * k_buf.shape[-2])
            k_buf = torch.cat((self.keys[layer_idx], k.new_empty(*k.shape[:-2], capacity - old_len, k.shape[-1])), -2)
            v_buf = torch.cat((self.values[layer_idx], v.new_empty(*v.shape[:-2], capacity - old_len, v.shape[-1])), -2)
            self.buffers[layer_idx] = (k_buf, v_buf)  # (B, H, capacity, D) each
        k_buf[..., old_len:new_len, :] = k
        v_buf[..., old_len:new_len, :] = v
        self.keys[layer_idx], self.values[layer_idx] = k_buf[..., :new_len, :], v_buf[..., :new_len, :]  # (B, H, S, D)
        return self.keys[layer_idx], self.values[layer_idx]


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) boolean, True = may attend: query t (absolute position S - T + t) sees keys 0 .. S - T + t.

    With no cache S == T and this is the usual lower triangle. subtle: with a cache the T new queries are the LAST
    T positions, so the triangle is aligned bottom-right (a fused kernel's is_causal=True aligns it top-left, which
    is why lib/kernels.attention passes this mask explicitly after a cache).
    """
    q_pos = torch.arange(S - T, S, device=device)  # (T,) absolute positions of the queries
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (1, S) <= (T, 1) -> (T, S)


# --------------------------------------------------------------------------------------------------------------------
# Causal multi-head self-attention (handout §3.5.5)


class CausalMultiHeadSelfAttention(nn.Module):
    """MultiHead(x) = W_O concat_h(softmax(Q_h K_hᵀ / sqrt(D) + causal mask) V_h), Q/K rotated by RoPE if theta.

    attn_impl: the plain path (fast=False) always runs scaled_dot_product_attention above; with fast=True the fused
    kernel (lib/kernels.attention) runs unless attn_impl == "manual".
    """

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int | None = None, theta: float | None = None,
                 attn_impl: str = "sdpa", device=None, dtype=None, *, fast: bool = False):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.fast = fast
        # Each projection is (C, C) = all H heads' (D, C) matrices stacked; init as any Linear.
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = None
        if theta is not None:  # position="nope" passes theta=None: no position information at all
            if max_seq_len is None:
                raise ValueError("RoPE (theta given) needs max_seq_len for its cos/sin cache")
            self.rope = RotaryPositionalEmbedding(theta, d_model // num_heads, max_seq_len, device=device, fast=fast)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None,
                layer_idx: int = 0) -> Tensor:
        """x (B, T, C) -> (B, T, C). token_positions (T,) or (B, T); default 0..T-1 (or the cache's next T).

        With kv_cache, this layer's keys/values are appended to kv_cache at `layer_idx` and the queries attend
        over everything cached; the caller (TransformerLM) advances kv_cache.seq_len once all layers ran.
        """
        B, T, C = x.shape
        H = self.num_heads
        D = C // H
        if self.rope is not None and token_positions is None:
            offset = kv_cache.seq_len if kv_cache is not None else 0
            token_positions = torch.arange(offset, offset + T, device=x.device)  # (T,)
        # (B, T, C) -> (B, T, H, D): split C into H heads of D.
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        if self.fast and self.attn_impl == "sdpa":  # lib/kernels.py: the steps below with fused flash attention
            out = kernels.attention(q, k, v, self.rope, token_positions, kv_cache, layer_idx, causal_mask)  # (B, T, C)
            return self.output_proj(out)
        if self.rope is not None:
            # note: rotate before moving the heads forward, while q and k are still contiguous; the positions get a
            # trailing 1 to broadcast over the heads: (T,) -> (T, 1), (B, T) -> (B, T, 1).
            q = self.rope(q, token_positions[..., None])  # (B, T, H, D)
            k = self.rope(k, token_positions[..., None])  # (B, T, H, D)
        # (B, T, H, D) -> (B, H, T, D): heads become a batch dim for attention.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(layer_idx, k, v)  # (B, H, S, D) each, S = cached + T
        out = scaled_dot_product_attention(q, k, v, causal_mask(T, k.shape[-2], x.device))  # (B, H, T, D)
        # (B, H, T, D) -> (B, T, H, D) -> (B, T, C): concatenate the heads again.
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.output_proj(out)  # (B, T, C)


# --------------------------------------------------------------------------------------------------------------------
# Transformer block (handout §3.5, Figure 2) and the language model (§3.1)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(·)). Ablations: norm="post" | "none", ffn="silu"."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float | None, *,
                 norm: str = "pre", ffn: str = "swiglu", attn_impl: str = "sdpa", device=None, dtype=None,
                 fast: bool = False):
        super().__init__()
        self.norm = norm
        kw = dict(device=device, dtype=dtype, fast=fast)
        # Registered in the CS336 reference's state-dict order: attn, ln1, ffn, ln2.
        self.attn = CausalMultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, attn_impl, **kw)
        self.ln1 = RMSNorm(d_model, **kw) if norm != "none" else NoNorm()
        self.ffn = (SwiGLU if ffn == "swiglu" else SiLUFFN)(d_model, d_ff, **kw)
        self.ln2 = RMSNorm(d_model, **kw) if norm != "none" else NoNorm()

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None,
                layer_idx: int = 0) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        if self.norm == "post":  # Vaswani et al. 2017: normalise after each residual add
            x = self.ln1(x + self.attn(x, token_positions, kv_cache, layer_idx))
            return self.ln2(x + self.ffn(x))
        # Pre-norm (Xiong et al. 2020): the residual stream itself is never normalised; "none" makes ln* identities.
        x = x + self.attn(self.ln1(x), token_positions, kv_cache, layer_idx)
        return x + self.ffn(self.ln2(x))


class TransformerLM(nn.Module):
    """token ids (B, T) -> unnormalised next-token logits (B, T, V).

    Embedding → num_layers TransformerBlocks → final RMSNorm → lm_head. `lm.config` is the ModelConfig.
    Weight tying (tie_embeddings=True): lm_head.weight IS token_embeddings.weight (one Parameter). parameters()
    yields it once, while state_dict() keeps both keys (PyTorch's usual behaviour for shared tensors), so a tied
    checkpoint has the same keys as an untied one and load_state_dict works unchanged.
    fast=True: every module takes its lib/kernels.py path (same results, faster); a run-time choice like
    checkpoint_blocks, so it is neither in ModelConfig nor in checkpoints.
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, rope_theta: float = 10_000.0, *, norm: str = "pre", position: str = "rope",
                 ffn: str = "swiglu", tie_embeddings: bool = False, attn_impl: str = "sdpa", device=None, dtype=None,
                 fast: bool = False):
        super().__init__()
        self.config = ModelConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta,
                                  norm, position, ffn, tie_embeddings, attn_impl).validate()
        self.fast = fast
        theta = rope_theta if position == "rope" else None
        kw = dict(device=device, dtype=dtype, fast=fast)
        self.token_embeddings = Embedding(vocab_size, d_model, **kw)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, context_length, theta, norm=norm, ffn=ffn,
                             attn_impl=attn_impl, **kw)
            for _ in range(num_layers)
        )
        # note: post-norm keeps ln_final too (its last block already ends in a norm, so it only rescales by its
        # gain): the pre- and post-norm ablations then differ only in where the norms sit, not in parameters or keys.
        self.ln_final = RMSNorm(d_model, **kw) if norm != "none" else NoNorm()
        self.lm_head = Linear(d_model, vocab_size, device=device, dtype=dtype)
        if tie_embeddings:
            # note: the shared matrix keeps lm_head's init N(0, 2/(V+C)) (std ≈ 0.014 here, like GPT-2's 0.02):
            # the embedding's N(0, 1) would make the initial logits' std ≈ sqrt(C) and the first loss huge.
            self.token_embeddings.weight = self.lm_head.weight
        # Activation checkpointing (Chen et al. 2016), a training-time switch, not part of the architecture (so not
        # in ModelConfig or checkpoints): train.py sets it for --activation-checkpointing.
        self.checkpoint_blocks = False

    def forward(self, token_ids: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """token_ids (B, T) int64 -> logits (B, T, V).

        With kv_cache: token_ids are the positions kv_cache.seq_len .. seq_len+T-1 and attend over the cache too;
        the cache is extended and kv_cache.seq_len advanced by T.
        """
        self._check_input(token_ids, kv_cache)
        offset = kv_cache.seq_len if kv_cache is not None else 0
        T = token_ids.shape[1]
        token_positions = torch.arange(offset, offset + T, device=token_ids.device)  # (T,)
        x = self.token_embeddings(token_ids)  # (B, T) -> (B, T, C)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_blocks and torch.is_grad_enabled() and kv_cache is None:
                # Keep only the block's input x; backward runs the block's forward again to get back what its
                # backward needs. Non-reentrant (the current torch API): works with hooks, FSDP and compile.
                x = torch.utils.checkpoint.checkpoint(layer, x, token_positions, None, i, use_reentrant=False)
            else:
                x = layer(x, token_positions, kv_cache, i)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.seq_len += T
        return self.lm_head(self.ln_final(x))  # (B, T, C) -> (B, T, V)

    def _check_input(self, token_ids: Tensor, kv_cache: KVCache | None) -> None:
        """Raise ValueError for inputs the model cannot handle (rather than an IndexError deep inside)."""
        cfg = self.config
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be (batch, seq_len), got shape {tuple(token_ids.shape)}")
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        offset = kv_cache.seq_len if kv_cache is not None else 0
        T = token_ids.shape[1]
        if offset + T > cfg.context_length:
            where = f"cache has {offset} + {T} new" if kv_cache is not None else f"{T}"
            raise ValueError(f"sequence length {where} exceeds context_length {cfg.context_length}; "
                             "crop the input (or start a fresh KVCache)")
        if kv_cache is not None and kv_cache.keys and kv_cache.keys[0].shape[0] != token_ids.shape[0]:
            raise ValueError(f"batch size {token_ids.shape[0]} differs from the KV cache's {kv_cache.keys[0].shape[0]}")
        # note: the range check reads the ids back (a host sync on GPU); torch.compile skips it (no graph break).
        if token_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {lo} max {hi}; "
                                 "does the tokenizer's vocab match the model's vocab_size?")


# --------------------------------------------------------------------------------------------------------------------
# Configuration: every knob of the model, including the ablations (handout §3.5 and §7)

NORMS = ("pre", "post", "none")
POSITIONS = ("rope", "nope")
FFNS = ("swiglu", "silu")
ATTN_IMPLS = ("sdpa", "manual")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a TransformerLM: `TransformerLM(**dataclasses.asdict(cfg))`.

    Checkpoints store `dataclasses.asdict(cfg)` (plain ints, floats and strings), so they load with weights_only=True.
    """

    vocab_size: int = 10_000
    context_length: int = 256
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 16
    d_ff: int = 1344
    rope_theta: float = 10_000.0
    norm: str = "pre"  # "pre" (Llama, default) | "post" (Vaswani et al. 2017) | "none" (no RMSNorm at all)
    position: str = "rope"  # "rope" (Su et al. 2021) | "nope" (no position information, Kazemnejad et al. 2023)
    ffn: str = "swiglu"  # "swiglu" (Shazeer 2020: w1, w2, w3) | "silu" (two matrices, w1 and w2)
    tie_embeddings: bool = False  # lm_head.weight is token_embeddings.weight (Press & Wolf 2017)
    # With fast=True: "sdpa" runs the fused kernel (lib/kernels.attention), "manual" the from-scratch
    # scaled_dot_product_attention; the plain path (fast=False) always runs the latter. Kept in checkpoints.
    attn_impl: str = "sdpa"

    def validate(self) -> "ModelConfig":
        """Raise ValueError with one clear line for a config that cannot build a model; return self."""
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        for name, choices in (("norm", NORMS), ("position", POSITIONS), ("ffn", FFNS), ("attn_impl", ATTN_IMPLS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        if self.position == "rope":
            if (self.d_model // self.num_heads) % 2 != 0:
                head_dim = self.d_model // self.num_heads
                raise ValueError(f"RoPE needs an even head dim, got d_model/num_heads = {head_dim}")
            if not self.rope_theta > 0:
                raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        return self

    def with_overrides(self, **fields) -> "ModelConfig":
        """A validated copy with the given fields replaced; a None value keeps the field (an absent CLI flag).

        The one home of the handout's rule for the SiLU FFN ablation: switching to ffn="silu" without a d_ff makes
        d_ff = 4 * d_model (of the new d_model), so the two-matrix FFN has about the parameters of the three-matrix
        SwiGLU at d_ff = 8/3 * d_model. model.py's, accounting.py's and train.py's flags all come through here.
        """
        changes = {name: value for name, value in fields.items() if value is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown model field(s) {', '.join(unknown)}")
        if changes.get("ffn") == "silu" and self.ffn != "silu" and "d_ff" not in changes:
            changes["d_ff"] = SILU_D_FF_PER_D_MODEL * changes.get("d_model", self.d_model)
        return dataclasses.replace(self, **changes).validate()


SILU_D_FF_PER_D_MODEL = 4  # the SiLU ablation's FFN width, d_ff = 4 * d_model (handout §7.3, as GPT-2's MLP)


PRESETS: dict[str, ModelConfig] = {
    # A fast model for tests and CPU demos.
    "tiny": ModelConfig(vocab_size=10_000, context_length=256, d_model=256, num_layers=4, num_heads=8, d_ff=688),
    # The handout's TinyStories model (§7.2): ~17M non-embedding parameters.
    "ts17m": ModelConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
}


# --------------------------------------------------------------------------------------------------------------------
# CLI: parameter counts and a smoke forward pass


def main(argv=None) -> None:
    parser = OneLineParser(prog="model.py",
                           description="Build a TransformerLM, print its parameters, run one forward pass.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--norm", choices=NORMS, default=None)
    parser.add_argument("--position", choices=POSITIONS, default=None)
    parser.add_argument("--ffn", choices=FFNS, default=None)
    parser.add_argument("--d-ff", type=int, default=None, help="default: the preset's, or 4*d_model for --ffn silu")
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument("--attn-impl", choices=ATTN_IMPLS, default=None)
    args = parser.parse_args(argv)

    try:
        cfg = PRESETS[args.preset].with_overrides(norm=args.norm, position=args.position, ffn=args.ffn,
                                                  d_ff=args.d_ff, attn_impl=args.attn_impl,
                                                  tie_embeddings=args.tie_embeddings or None)
    except ValueError as e:
        parser.error(str(e))  # one line, exit code 2
    lm = TransformerLM(**dataclasses.asdict(cfg))
    n_params = sum(p.numel() for p in lm.parameters())
    n_embed = lm.token_embeddings.weight.numel()
    print(cfg)
    print(f"parameters: {n_params:,} ({n_params - n_embed:,} without the token embedding)")
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        logits = lm(ids)
    from optim import cross_entropy  # the project's loss (optim.py); imported here so model.py stands alone

    print(f"forward: ids {tuple(ids.shape)} -> logits {tuple(logits.shape)}, "
          f"loss at init {cross_entropy(logits, ids).item():.3f} "
          f"(ln V = {math.log(cfg.vocab_size):.3f})")


if __name__ == "__main__":
    main()
