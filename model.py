"""The Llama-style Transformer language model of CS336 assignment 1 (handout §3), from scratch.

Built bottom-up from nothing but `nn.Parameter` and container modules: Linear → Embedding → RMSNorm → SwiGLU →
softmax → RoPE → attention → block → LM. The one fused kernel allowed, `F.scaled_dot_product_attention`, sits beside
the readable from-scratch attention and is tested equal to it (tests/test_model.py). A KV cache (`KVCache`) lets
sample.py decode one token at a time without recomputing the prefix. `to_hf_llama_state_dict` and
`from_hf_llama_state_dict` (with the config mappings beside them) convert to and from transformers' LlamaForCausalLM,
which is this architecture under other names (train.py export / import).

    python model.py                          # parameter counts of the presets and a forward pass on random ids
    python model.py --preset ts17m --norm post --position nope
    python -m pytest tests/test_model.py

Layers: cli -> bpe -> model, optim -> accounting -> train -> sample; model.py needs nothing above cli.py (its
`main` borrows optim.cross_entropy only to print the loss at init).

Shape legend: B batch, T sequence (query) length, S key length (cached + new), C d_model, H heads, D head dim
(C / H), V vocab, F d_ff.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from lib.cli import BadInputError, OneLineParser


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
    attn_impl: str = "sdpa"  # "sdpa" (fused torch kernel) | "manual" (the from-scratch reference below)

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

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        # Init (handout §3.4.1): N(0, 1) truncated at ±3.
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        # The rows weight[token_ids], (B, T) -> (B, T, C), gathered as index_select of the flattened ids. note: the
        # same rows, but index_select's backward is one index_add_, where indexing's is an accumulating index_put_:
        # forward + backward ~3x faster on CPU (0.24 vs 0.86 ms at (12, 64) ids, V 256, C 128; 3.6 vs 9.9 ms at
        # ts17m's (8, 256), V 10,000, C 512). tests/test_model.py checks both equal, gradients too.
        return self.weight.index_select(0, token_ids.reshape(-1)).view(*token_ids.shape, -1)


# --------------------------------------------------------------------------------------------------------------------
# RMSNorm (Zhang & Sennrich 2019; handout §3.5.1)


RMS_NORM_EPS = 1e-5  # the handout's ε (and Llama 2/3's rms_norm_eps): keeps 1/RMS finite for an all-zero input


class RMSNorm(nn.Module):
    """x / RMS(x) * g, with RMS(x) = sqrt(mean(x²) + eps) over the last dim; g is the learned gain."""

    def __init__(self, d_model: int, eps: float = RMS_NORM_EPS, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        # Init: g = 1, so the layer starts as a pure normalisation.
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # note: squaring in bf16/fp16 overflows or loses precision, so both paths compute in fp32 (or float64) and
        # cast back.
        if torch.compiler.is_compiling():  # torch.compile fuses the reference's ops; it need not see our backward
            return self.reference(x.to(_at_least_fp32(x.dtype))).to(x.dtype)
        return _RMSNormFunction.apply(x, self.weight, self.eps)

    def reference(self, x: Tensor) -> Tensor:
        """The readable definition (x fp32 or float64, and so is the result); autograd differentiates it op by op."""
        inv_rms = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., C) -> (..., 1)
        return x * inv_rms * self.weight.to(x.dtype)  # (..., C) * (..., 1) * (C,) -> (..., C)


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for a 16-bit float dtype, else the dtype itself (fp32, float64)."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm.reference with its gradient written out, so that backward is 6 passes over (..., C) instead of the
    ~17 ops autograd records for the reference. At small sizes every op costs a fixed ~30 us, and on CPU a fresh
    (..., C) tensor costs more again than one written in place (its memory is not in cache): so forward allocates
    one tensor and backward two, and the two sums over a row or a column are matrix-vector products (one BLAS pass
    each). A whole training step is 2-3.5% faster at bench/bench_small.py's size than with the previous version of
    this function, which kept x̂ and summed with separate multiply and sum kernels (BENCHMARKS.md). It keeps the
    fp32 input x and r = 1 / RMS(x) for backward: for an fp32 input that is the tensor itself, no copy
    (accounting.saved_activations). tests/test_model.py checks values and gradients against the reference.

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


class NoNorm(nn.Module):
    """The norm="none" ablation: the identity, with no parameters (so no ln*.weight keys in the state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# --------------------------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU (Shazeer 2020; handout §3.5.2) and the plain SiLU ablation


def silu(x: Tensor) -> Tensor:
    """SiLU / Swish (Elfwing et al. 2017): x · σ(x). The readable definition; the FFNs below call F.silu.

    note: F.silu is this function as one kernel forward and one backward (silu_backward), where x * sigmoid(x) is
    sigmoid + mul forward and sigmoid_backward + 2 muls backward: fewer passes over the (B, T, F) activations and
    fewer op launches. tests/test_model.py checks the two equal, values and gradients.
    """
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) ⊙ W3 x); w1, w3 are (F, C), w2 is (C, F). SiLU is F.silu, the fused silu() above;
    the gate SiLU(a) ⊙ b runs as _SwiGLUGate, the same product with its gradient written out (see there)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w1(x), self.w3(x)  # (B, T, C) -> (B, T, F) each
        if torch.compiler.is_compiling() or a.dtype != b.dtype:  # the readable product (torch.compile fuses it)
            return self.w2(F.silu(a) * b)  # (B, T, F) -> (B, T, C)
        return self.w2(_SwiGLUGate.apply(a, b))  # (B, T, F) -> (B, T, C)


class _SwiGLUGate(torch.autograd.Function):
    """SiLU(a) ⊙ b, as `F.silu(a) * b` computes it, with the gradient written out:
        dL/db = dh ⊙ SiLU(a),  dL/da = dh ⊙ b ⊙ SiLU'(a)   (silu_backward computes the second from dh ⊙ b and a).
    Autograd of `F.silu(a) * b` keeps a, SiLU(a) and b; this keeps a and b only and computes SiLU(a) again in
    backward (one cheap pass), so the FFN keeps 3 (B, T, F) tensors instead of 4 (accounting.saved_activations),
    and it writes SiLU(a) ⊙ b and silu_backward's result in place: on CPU a fresh (B, T, F) tensor costs more than
    the pass that fills it (its memory is not in cache). A training step is 2-3% faster at bench/bench_small.py's
    size (BENCHMARKS.md). tests/test_model.py checks values and gradients against `F.silu(a) * b`."""

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


class SiLUFFN(nn.Module):
    """The ffn="silu" ablation: FFN(x) = W2 SiLU(W1 x), two matrices (no gate w3); d_ff is usually 4·d_model."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


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


CPU_FP32_ATTENTION_MAX_HEAD_DIM = 64  # see fused_attention


def fused_attention(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """F.scaled_dot_product_attention (flash attention on GPU and CPU), the same softmax(Q Kᵀ / sqrt(D)) V as above;
    kwargs are its attn_mask / is_causal. The result has v's dtype.

    note: on CPU in bf16 or fp16 with a head dim of at most 64, it computes in fp32 and rounds the result back:
    torch's 16-bit CPU kernel is slower there than its fp32 one, backward most of all. Forward + backward at
    ts17m's (8, 16, 256, 32): 36.7 ms in bf16, 22.5 in fp32; (8, 8, 256, 64): 21.7 vs 19.8; at head dim 128 the
    bf16 kernel wins, (8, 4, 256, 128): 10.7 vs 18.4 (BENCHMARKS.md, an AMX Xeon). More precise, never less.
    q and k may then arrive in fp32 already (CausalMultiHeadSelfAttention's RoPE hands them over so)."""
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


# --------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021, RoFormer; handout §3.5.3)


class RotaryPositionalEmbedding(nn.Module):
    """Rotates each adjacent pair (x[2k], x[2k+1]) of a query/key vector at position i by the angle i · θ^(-2k/D).

    note: adjacent pairs, as in the handout and the RoFormer paper; Llama/HF's code rotates the two halves
    (x[k], x[k + D/2]) instead — the same idea with a permuted head dim, so the weights are not interchangeable.
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
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
        # The fast path's table (_rotate_complex): e^(i·angle) as (cos, sin) pairs, which view_as_complex reads as
        # (max_seq_len, D/2) complex numbers without a copy. note: a real buffer, as a complex one would be cast to
        # real by model.to(dtype).
        self.register_buffer("rotations", torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1),
                             persistent=False)  # (max_seq_len, D/2, 2)

    def forward(self, x: Tensor, token_positions: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """x (..., T, D), token_positions (..., T) ints, broadcastable to x.shape[:-1] -> (..., T, D); the result
        in `dtype`, by default x's."""
        if not torch.compiler.is_compiling():
            return self._rotate_complex(x, token_positions, dtype or x.dtype)
        # The readable reference (and what torch.compile runs: it fuses these ops but cannot generate complex ones).
        # subtle: the cache is fp32; cast to x's dtype so bf16 activations stay bf16 (HF Llama does the same).
        cos = self.cos[token_positions].to(x.dtype)  # (..., T, D): (c0, c0, c1, c1, ...)
        sin = self.sin[token_positions].to(x.dtype)  # (..., T, D): (-s0, s0, -s1, s1, ...)
        # The 2-D rotation of each pair: (x0, x1) -> (c·x0 - s·x1, s·x0 + c·x1) = c·(x0, x1) + s·(-x1, x0).
        # Swapping each pair gives (x1, x0, x3, x2, ...); the signed sin supplies the minus.
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., T, D/2, 2) -> pairs swapped -> (..., T, D)
        return (x * cos + swapped * sin).to(dtype or x.dtype)  # (..., T, D)

    def _rotate_complex(self, x: Tensor, token_positions: Tensor, dtype: torch.dtype) -> Tensor:
        """The same rotation as one complex multiply (RoFormer §3.4.2; Meta's Llama code): a pair (x0, x1) is the
        number x0 + i·x1, and rotating it by an angle is multiplying by e^(i·angle).

        Why faster on CPU: one kernel forward and one backward, where the lines above are a flip copy, two
        broadcast multiplies and an add (each a pass over q or k), and the same again in backward. Computed in fp32
        (there is no bf16 complex type) and cast to `dtype`. tests/test_model.py checks it equal to the reference.
        note: the factors are one lookup in the `rotations` table, where building them from the cos and sin rows
        took five ops (two lookups, two strided slices, torch.complex): ~50 us less per attention layer's forward +
        backward at bench_small.py's size, where every op costs several microseconds; its training step ~0.4% less
        (BENCHMARKS.md).
        """
        rotation = torch.view_as_complex(self.rotations.float())[token_positions]  # (..., T, D/2): e^(i·angle)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., T, D/2, 2) -> (..., T, D/2) complex
        rotated = pairs * rotation  # (..., T, D/2) * (..., T, D/2): each pair turned by its angle
        return torch.view_as_real(rotated).flatten(-2).to(dtype)  # (..., T, D/2, 2) -> (..., T, D)


# --------------------------------------------------------------------------------------------------------------------
# KV cache: the keys and values of the positions already seen, for incremental decoding (used by sample.py)


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


# --------------------------------------------------------------------------------------------------------------------
# Causal multi-head self-attention (handout §3.5.5)


def causal_mask(T: int, S: int, device=None) -> Tensor:
    """(T, S) boolean, True = may attend: query t (absolute position S - T + t) sees keys 0 .. S - T + t.

    With no cache S == T and this is the usual lower triangle. subtle: with a cache the T new queries are the LAST
    T positions, so the triangle is aligned bottom-right; F.scaled_dot_product_attention(is_causal=True) aligns it
    top-left, which is why the cached path passes this mask explicitly.
    """
    q_pos = torch.arange(S - T, S, device=device)  # (T,) absolute positions of the queries
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] <= q_pos[:, None]  # (1, S) <= (T, 1) -> (T, S)


class CausalMultiHeadSelfAttention(nn.Module):
    """MultiHead(x) = W_O concat_h(softmax(Q_h K_hᵀ / sqrt(D) + causal mask) V_h), Q/K rotated by RoPE if theta."""

    def __init__(self, d_model: int, num_heads: int, max_seq_len: int | None = None, theta: float | None = None,
                 attn_impl: str = "sdpa", device=None, dtype=None):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        # Each projection is (C, C) = all H heads' (D, C) matrices stacked; init as any Linear.
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = None
        if theta is not None:  # position="nope" passes theta=None: no position information at all
            if max_seq_len is None:
                raise ValueError("RoPE (theta given) needs max_seq_len for its cos/sin cache")
            self.rope = RotaryPositionalEmbedding(theta, d_model // num_heads, max_seq_len, device=device)

    def forward(self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None,
                layer_idx: int = 0) -> Tensor:
        """x (B, T, C) -> (B, T, C). token_positions (T,) or (B, T); default 0..T-1 (or the cache's next T).

        With kv_cache, this layer's keys/values are appended to kv_cache at `layer_idx` and the queries attend
        over everything cached; the caller (TransformerLM) advances kv_cache.seq_len once all layers ran.
        """
        B, T, C = x.shape
        H = self.num_heads
        D = C // H
        offset = kv_cache.seq_len if kv_cache is not None else 0
        # (B, T, C) -> (B, T, H, D): split C into H heads of D.
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, H, D)
        v = self.v_proj(x).view(B, T, H, D)
        if self.rope is not None:
            if token_positions is None:
                token_positions = torch.arange(offset, offset + T, device=x.device)  # (T,)
            # note: rotate before moving the heads forward, while q and k are still contiguous (faster element-wise
            # ops); the positions get a trailing 1 to broadcast over the heads: (T,) -> (T, 1), (B, T) -> (B, T, 1).
            # note: where fused_attention computes in fp32 (16-bit activations on CPU, small heads), RoPE, itself in
            # fp32, hands q and k over in fp32 instead of rounding them to bf16 for attention to cast straight back:
            # 4 casts fewer per layer forward and 4 backward, ~1.5% of the layer's forward + backward at ts17m
            # (BENCHMARKS.md). Decoding keeps its cache in the activations' dtype.
            fp32_ok = self.attn_impl == "sdpa" and kv_cache is None
            rope_dtype = attention_dtype(q) if fp32_ok else q.dtype
            q = self.rope(q, token_positions[..., None], rope_dtype)  # (B, T, H, D)
            k = self.rope(k, token_positions[..., None], rope_dtype)  # (B, T, H, D)
        # (B, T, H, D) -> (B, H, T, D): heads become a batch dim for attention.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(layer_idx, k, v)  # (B, H, S, D) each, S = offset + T
        S = k.shape[-2]

        if self.attn_impl == "manual":
            out = scaled_dot_product_attention(q, k, v, causal_mask(T, S, x.device))  # (B, H, T, D)
        elif S == T:
            # The fused kernel (flash attention on GPU and CPU); is_causal builds the lower triangle itself.
            out = fused_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        elif T == 1:
            # One new token is the last position: it may attend to every cached key, so no mask at all.
            out = fused_attention(q, k, v)  # (B, H, 1, D)
        else:
            # Several new tokens after a cache: the bottom-right-aligned triangle (see causal_mask).
            out = fused_attention(q, k, v, attn_mask=causal_mask(T, S, x.device))  # (B, H, T, D)
        # (B, H, T, D) -> (B, T, H, D) -> (B, T, C): concatenate the heads again.
        out = out.transpose(1, 2).reshape(B, T, C)
        return self.output_proj(out)  # (B, T, C)


# --------------------------------------------------------------------------------------------------------------------
# Transformer block (handout §3.5, Figure 2) and the language model (§3.1)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then + FFN(RMSNorm(·)). Ablations: norm="post" | "none", ffn="silu"."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, max_seq_len: int, theta: float | None, *,
                 norm: str = "pre", ffn: str = "swiglu", attn_impl: str = "sdpa", device=None, dtype=None):
        super().__init__()
        self.norm = norm
        # Registered in the CS336 reference's state-dict order: attn, ln1, ffn, ln2.
        self.attn = CausalMultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, attn_impl,
                                                 device=device, dtype=dtype)
        self.ln1 = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else NoNorm()
        self.ffn = (SwiGLU if ffn == "swiglu" else SiLUFFN)(d_model, d_ff, device=device, dtype=dtype)
        self.ln2 = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else NoNorm()

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
    """

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: int, rope_theta: float = 10_000.0, *, norm: str = "pre", position: str = "rope",
                 ffn: str = "swiglu", tie_embeddings: bool = False, attn_impl: str = "sdpa", device=None, dtype=None):
        super().__init__()
        self.config = ModelConfig(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta,
                                  norm, position, ffn, tie_embeddings, attn_impl).validate()
        theta = rope_theta if position == "rope" else None
        self.token_embeddings = Embedding(vocab_size, d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, context_length, theta, norm=norm, ffn=ffn,
                             attn_impl=attn_impl, device=device, dtype=dtype)
            for _ in range(num_layers)
        )
        # note: post-norm keeps ln_final too (its last block already ends in a norm, so it only rescales by its
        # gain): the pre- and post-norm ablations then differ only in where the norms sit, not in parameters or keys.
        self.ln_final = RMSNorm(d_model, device=device, dtype=dtype) if norm != "none" else NoNorm()
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
# Hugging Face Llama: the same model under other names (train.py export / import)

# TransformerLM with norm="pre", position="rope", ffn="swiglu" is Llama's architecture (Touvron et al. 2023):
# pre-norm RMSNorm, SwiGLU, RoPE, no biases. So a checkpoint converts to a transformers LlamaForCausalLM (and back)
# by renaming tensors and one permutation (rope_pairs_to_halves); nothing is re-derived or approximated.
# tests/test_hf.py checks the logits against transformers' own model.

# Our state-dict names -> HF's, outside the blocks and inside block i ("layers.{i}." <-> "model.layers.{i}.").
HF_LLAMA_NAMES = {"token_embeddings.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight",
                  "lm_head.weight": "lm_head.weight"}
HF_LLAMA_LAYER_NAMES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                        "attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj",
                        "ln1": "input_layernorm", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
                        "ffn.w2": "mlp.down_proj", "ln2": "post_attention_layernorm"}
ROPE_PROJECTIONS = ("attn.q_proj.weight", "attn.k_proj.weight")  # the rows RoPE rotates: permuted on conversion
# The ablations a LlamaConfig cannot express: field -> (the only value HF Llama has, what that value means).
HF_LLAMA_FIXED = {"norm": ("pre", "pre-norm RMSNorm"), "position": ("rope", "RoPE in every attention layer"),
                  "ffn": ("swiglu", "the gated SwiGLU FFN (gate, up and down projections)")}


def hf_llama_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) of every tensor HF stores, in order. A tied lm_head is left out: HF stores only
    model.embed_tokens.weight and ties lm_head to it (tie_word_embeddings)."""
    names = [("token_embeddings.weight", HF_LLAMA_NAMES["token_embeddings.weight"])]
    for i in range(cfg.num_layers):
        names += [(f"layers.{i}.{ours}.weight", f"model.layers.{i}.{hf}.weight")
                  for ours, hf in HF_LLAMA_LAYER_NAMES.items()]
    names.append(("ln_final.weight", HF_LLAMA_NAMES["ln_final.weight"]))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", HF_LLAMA_NAMES["lm_head.weight"]))
    return names


def rope_pairs_to_halves(w: Tensor, num_heads: int) -> Tensor:
    """q_proj/k_proj weight (H·D, C) from our RoPE layout to HF Llama's: per head, output rows 0, 2, 4, ..., D-2,
    then 1, 3, ..., D-1.

    subtle: our RoPE rotates adjacent pairs (x[2k], x[2k+1]) by angle k; HF's rotate_half rotates (x[k], x[k+D/2]).
    Moving row 2k to k and row 2k+1 to k+D/2 makes HF's rotation act on exactly the numbers ours does, and since
    q·k sums over the whole head dim, any permutation applied to both q and k leaves the attention scores unchanged.
    v, o and the FFN are not rotated, so they are not permuted. (HF's own Meta -> HF converter does the same.)"""
    rows, C = w.shape
    D = rows // num_heads
    # (H·D, C) -> (H, D/2, 2, C): head, pair k, member p of the pair -> (H, 2, D/2, C): all first members, then all
    # second members -> (H·D, C)
    return w.reshape(num_heads, D // 2, 2, C).transpose(1, 2).reshape(rows, C)


def rope_halves_to_pairs(w: Tensor, num_heads: int) -> Tensor:
    """The inverse of rope_pairs_to_halves: HF's rotate-half rows (H·D, C) back to our adjacent pairs."""
    rows, C = w.shape
    D = rows // num_heads
    return w.reshape(num_heads, 2, D // 2, C).transpose(1, 2).reshape(rows, C)  # (H, 2, D/2, C) -> (H, D/2, 2, C)


def to_hf_llama_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """The config.json of a LlamaForCausalLM that computes what TransformerLM(cfg) does; an ablation Llama cannot
    express is a BadInputError naming the field. Written in the keys both transformers 4.x and 5.x read."""
    for field, (want, meaning) in HF_LLAMA_FIXED.items():
        if getattr(cfg, field) != want:
            raise BadInputError(f"cannot export {field}={getattr(cfg, field)!r}: Hugging Face Llama always has "
                                f"{meaning} ({field}={want!r}); this ablation has no LlamaConfig equivalent")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,  # no grouped-query attention
            "head_dim": cfg.d_model // cfg.num_heads, "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": float(cfg.rope_theta), "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "torch_dtype": "float32", "use_cache": True}


def from_hf_llama_config(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama config.json (`where` names it in errors); what TransformerLM cannot
    represent (grouped-query attention, biases, rope scaling, another activation or eps) is a BadInputError."""
    def get(key, default=KeyError):
        if key not in hf and default is KeyError:
            raise BadInputError(f"{where} has no {key!r}: is it a Hugging Face Llama config.json?")
        return hf.get(key, default)

    if get("model_type") != "llama":
        raise BadInputError(f"{where}: model_type {hf['model_type']!r} is not 'llama'; only LlamaForCausalLM "
                            f"directories can be imported")
    heads, d_model = get("num_attention_heads"), get("hidden_size")
    kv_heads, head_dim = get("num_key_value_heads", heads), get("head_dim", None)
    theta = _hf_rope_theta(hf, where)
    problems = [(kv_heads != heads, f"grouped-query attention (num_key_value_heads {kv_heads} < "
                 f"num_attention_heads {heads}): model.py's attention has one key/value head per query head"),
                (get("attention_bias", False), "attention_bias is true: model.py's Linear layers have no biases"),
                (get("mlp_bias", False), "mlp_bias is true: model.py's Linear layers have no biases"),
                (get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} is not silu (SwiGLU)"),
                (head_dim not in (None, d_model // heads), f"head_dim {head_dim} is not hidden_size / "
                 f"num_attention_heads = {d_model // heads}, the only head size model.py has"),
                (get("rms_norm_eps", RMS_NORM_EPS) != RMS_NORM_EPS, f"rms_norm_eps {hf.get('rms_norm_eps')} differs "
                 f"from model.py's RMSNorm eps {RMS_NORM_EPS}")]
    for bad, why in problems:
        if bad:
            raise BadInputError(f"{where}: {why}")
    try:
        return ModelConfig(vocab_size=get("vocab_size"), context_length=get("max_position_embeddings"),
                           d_model=d_model, num_layers=get("num_hidden_layers"), num_heads=heads,
                           d_ff=get("intermediate_size"), rope_theta=theta,
                           tie_embeddings=bool(get("tie_word_embeddings", False))).validate()
    except ValueError as e:
        raise BadInputError(f"{where}: {e}") from None


HF_DEFAULT_ROPE_THETA = 10_000.0  # LlamaConfig's default when config.json names none


def _hf_rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 4.x keys (rope_theta, rope_scaling) or 5.x's (rope_parameters); any scaling
    (linear, dynamic, yarn, llama3, ...) is refused: our RoPE has only theta."""
    scaling, params = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise BadInputError(f"{where}: rope scaling {kind!r} ({scaling or params}): model.py's RoPE has no scaling, "
                            f"only rope_theta")
    return float(hf.get("rope_theta", params.get("rope_theta", HF_DEFAULT_ROPE_THETA)))


def to_hf_llama_state_dict(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> LlamaForCausalLM's: renamed, q/k rows permuted per head, a tied lm_head left out."""
    to_hf_llama_config(cfg, None, None)  # refuses the ablations HF cannot express
    out = {}
    for ours, hf in hf_llama_names(cfg):
        w = state_dict[ours]
        if ours.endswith(ROPE_PROJECTIONS):
            w = rope_pairs_to_halves(w, cfg.num_heads)
        out[hf] = w.contiguous()  # note: safetensors stores contiguous tensors only
    return out


def from_hf_llama_state_dict(cfg: ModelConfig, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """LlamaForCausalLM's tensors -> a state dict for TransformerLM(cfg), in fp32 (bf16/fp16 convert exactly).
    Biases, unknown or missing tensors and wrong shapes are a BadInputError naming the first one."""
    biases = sorted(k for k in tensors if k.endswith(".bias"))
    if biases:
        raise BadInputError(f"{where}: {biases[0]} is a bias ({len(biases)} bias tensors): model.py's Linear layers "
                            f"have none")
    names = hf_llama_names(cfg)
    known = {hf for _, hf in names} | {HF_LLAMA_NAMES["lm_head.weight"]}  # a tied lm_head may be stored anyway
    unknown = sorted(k for k in tensors if k not in known and not k.endswith("rotary_emb.inv_freq"))  # a buffer
    if unknown:
        raise BadInputError(f"{where}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all): not a "
                            f"LlamaForCausalLM with this config.json")
    shapes = {k: v.shape for k, v in TransformerLM(**dataclasses.asdict(cfg), device="meta").state_dict().items()}
    out = {}
    for ours, hf in names:
        if hf not in tensors:
            raise BadInputError(f"{where}: tensor {hf!r} is missing")
        if tensors[hf].shape != shapes[ours]:
            raise BadInputError(f"{where}: {hf} has shape {tuple(tensors[hf].shape)}, config.json implies "
                                f"{tuple(shapes[ours])}")
        w = tensors[hf].to(torch.float32)
        out[ours] = rope_halves_to_pairs(w, cfg.num_heads) if ours.endswith(ROPE_PROJECTIONS) else w
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["token_embeddings.weight"]  # one tensor under both keys, as state_dict() has
    return out


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
