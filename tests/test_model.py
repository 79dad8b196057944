"""Tests for model.py: every from-scratch module against its PyTorch built-in (F.linear, F.embedding, F.rms_norm,
torch.softmax, F.scaled_dot_product_attention, F.silu) or an independent implementation (RoPE via complex numbers);
the whole model's state-dict keys, parameter count formula, causality, fused-vs-manual attention (outputs and
gradients), the KV cache (cached logits == full-sequence logits, both attention paths, any chunking), every
ablation's parameters and keys, input checks, and a tiny model overfitting one batch.

    python -m pytest tests/test_model.py            # these tests (all fast)
    python -m pytest -m slow                       # the slow end-to-end checks of the whole suite
"""
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (PRESETS, CausalMultiHeadSelfAttention, Embedding, KVCache, Linear, ModelConfig, RMSNorm,
                   RotaryPositionalEmbedding, SiLUFFN, SwiGLU, TransformerBlock, TransformerLM, _SwiGLUGate,
                   causal_mask, fused_attention, scaled_dot_product_attention, silu, softmax)

# A small but complete config: every code path (RoPE, several heads, several layers) at test speed.
SMALL = dict(vocab_size=97, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48, rope_theta=10_000.0)


def small_lm(seed=0, **overrides) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(**{**SMALL, **overrides})


def expected_keys(num_layers, norm="pre", ffn="swiglu"):
    keys = ["token_embeddings.weight"]
    for i in range(num_layers):
        keys += [f"layers.{i}.attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
        if norm != "none":
            keys.append(f"layers.{i}.ln1.weight")
        keys += [f"layers.{i}.ffn.{w}.weight" for w in (("w1", "w2", "w3") if ffn == "swiglu" else ("w1", "w2"))]
        if norm != "none":
            keys.append(f"layers.{i}.ln2.weight")
    if norm != "none":
        keys.append("ln_final.weight")
    keys.append("lm_head.weight")
    return keys


def count_formula(V, T, C, L, H, F_, norm="pre", ffn="swiglu", tie=False):
    """Parameters by hand: embedding V·C, per layer 4C² (q, k, v, o) + FFN + norms, final norm, head V·C."""
    ffn_params = (3 if ffn == "swiglu" else 2) * C * F_
    norms_per_layer = 0 if norm == "none" else 2 * C
    final_norm = 0 if norm == "none" else C
    return V * C + L * (4 * C * C + ffn_params + norms_per_layer) + final_norm + (0 if tie else V * C)


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks against PyTorch


def test_linear_matches_f_linear_and_init():
    torch.manual_seed(0)
    lin = Linear(300, 200)
    assert lin.weight.shape == (200, 300)  # (out, in)
    x = torch.randn(4, 5, 300)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    std = math.sqrt(2 / (300 + 200))
    assert abs(lin.weight.std().item() - std * 0.9866) < 0.02 * std  # a ±3σ-truncated normal has std 0.9866σ
    assert lin.weight.abs().max().item() <= 3 * std + 1e-6
    assert not any(name.endswith("bias") for name, _ in lin.named_parameters())


def test_embedding_matches_f_embedding_and_init():
    torch.manual_seed(0)
    emb = Embedding(1000, 64)
    ids = torch.randint(0, 1000, (3, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb(ids).shape == (3, 7, 64)
    # the gradient (index_select's index_add_) equals plain indexing's, repeated ids summed
    ids = torch.tensor([[5, 5, 9], [5, 0, 9]])
    dy = torch.randn(2, 3, 64, dtype=torch.float64)
    emb64 = Embedding(1000, 64, dtype=torch.float64)
    weight = emb64.weight
    grad, = torch.autograd.grad(emb64(ids), weight, dy)
    ref, = torch.autograd.grad(weight[ids], weight, dy)
    torch.testing.assert_close(grad, ref)
    assert torch.equal(grad[5], dy[0, 0] + dy[0, 1] + dy[1, 0])
    assert emb.weight.abs().max().item() <= 3.0
    assert abs(emb.weight.std().item() - 0.9866) < 0.02


def test_rmsnorm_matches_torch_and_upcasts():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(2, 5, 64) * 3
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, eps=1e-5))
    # bf16 in -> bf16 out, equal to the fp32 computation rounded once (not a bf16 computation).
    xb = x.bfloat16()
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    ref = F.rms_norm(xb.float(), (64,), norm.weight, eps=1e-5).bfloat16()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 64), "transposed"])
def test_rmsnorm_hand_written_backward_equals_autograd_of_the_reference(shape):
    # forward runs _RMSNormFunction (its gradient written out); reference is the formula autograd differentiates.
    torch.manual_seed(0)
    norm = RMSNorm(64).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    if shape == "transposed":  # a non-contiguous input (backward flattens its rows with reshape, not view)
        x = (torch.randn(5, 2, 64, dtype=torch.float64) * 3).transpose(0, 1).requires_grad_()
        shape = x.shape
    else:
        x = (torch.randn(*shape, dtype=torch.float64) * 3).requires_grad_()
    dy = torch.randn(*shape, dtype=torch.float64)
    fast = torch.autograd.grad(norm(x), (x, norm.weight), dy)
    ref = torch.autograd.grad(norm.reference(x), (x, norm.weight), dy)
    torch.testing.assert_close(fast, ref)
    assert torch.autograd.gradcheck(norm, (x,))  # and against finite differences
    # bf16 in (autocast's case): the gradient comes back in bf16, the fp32 one rounded.
    norm = norm.float()
    xb = x.detach().bfloat16().requires_grad_()
    x32 = xb.detach().float().requires_grad_()
    grad_bf16, = torch.autograd.grad(norm(xb), xb, dy.bfloat16())
    grad_fp32, = torch.autograd.grad(norm.reference(x32), x32, dy.bfloat16().float())
    assert grad_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(grad_bf16, grad_fp32.bfloat16(), atol=1e-2, rtol=1e-2)


def test_silu_and_ffns_match_reference_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(silu(x), F.silu(x))  # our definition is the fused kernel the FFNs call
    torch.testing.assert_close(torch.autograd.grad(silu(x).sum(), x)[0], torch.autograd.grad(F.silu(x).sum(), x)[0])
    x = x.detach().float()
    ffn = SwiGLU(16, 40)
    assert (ffn.w1.weight.shape, ffn.w2.weight.shape, ffn.w3.weight.shape) == ((40, 16), (16, 40), (40, 16))
    ref = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), ref)
    plain = SiLUFFN(16, 64)
    assert not hasattr(plain, "w3")
    torch.testing.assert_close(plain(x), F.linear(F.silu(F.linear(x, plain.w1.weight)), plain.w2.weight))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swiglu_gate_hand_written_backward_equals_autograd_of_the_product(dtype):
    # SwiGLU runs _SwiGLUGate (SiLU(a) ⊙ b, gradient written out, SiLU(a) recomputed): against `F.silu(a) * b`.
    torch.manual_seed(0)
    a = (torch.randn(3, 7, 40, dtype=dtype) * 3).requires_grad_()
    b = torch.randn(3, 7, 40, dtype=dtype).requires_grad_()
    dh = torch.randn(3, 7, 40, dtype=dtype)
    fast = _SwiGLUGate.apply(a, b)
    ref = F.silu(a) * b
    assert fast.dtype == dtype
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)  # the same two kernels, so the same bits
    torch.testing.assert_close(torch.autograd.grad(fast, (a, b), dh), torch.autograd.grad(ref, (a, b), dh))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(_SwiGLUGate.apply, (a, b))  # and against finite differences
    ffn = SwiGLU(16, 40).to(dtype)  # the module takes this path and matches the readable formula
    x = torch.randn(2, 5, 16, dtype=dtype)
    ref = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_softmax_matches_torch_including_large_inputs(scale):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5) * scale
    for dim in (0, 1, -1):
        out = softmax(x, dim)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.softmax(x, dim))


@pytest.mark.parametrize("head_dim", [32, 128])
def test_fused_attention_computes_16_bit_cpu_attention_in_fp32_up_to_head_dim_64(head_dim):
    # model.fused_attention: on CPU in bf16 with head dim <= 64, F.sdpa on the fp32 inputs rounded back (torch's
    # 16-bit CPU kernel is slower there); at 128 the bf16 kernel itself. Gradients come back in bf16 either way.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, head_dim).bfloat16().requires_grad_() for _ in range(3))
    out = fused_attention(q, k, v, is_causal=True)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fp32 if head_dim <= 64 else bf16, atol=0, rtol=0)
    torch.testing.assert_close(out, bf16, atol=2e-2, rtol=2e-2)  # the same attention, up to bf16 rounding
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside autocast too (which would cast fp32 inputs back)
        torch.testing.assert_close(fused_attention(q, k, v, is_causal=True), out, atol=0, rtol=0)
    x = torch.randn(2, 3, 16, head_dim)  # fp32: torch's kernel, untouched
    torch.testing.assert_close(fused_attention(x, x, x), F.scaled_dot_product_attention(x, x, x),
                               atol=0, rtol=0)


def test_attention_hands_rope_output_to_fp32_attention_unrounded(monkeypatch):
    # Under CPU bf16 autocast with head dim <= 64 fused_attention computes in fp32, so RoPE passes q and k on in
    # fp32 instead of rounding them to bf16 for attention to cast back: the result is that computation, exactly.
    torch.manual_seed(0)
    B, T, C, H = 2, 16, 32, 2
    attn, x = CausalMultiHeadSelfAttention(C, H, T, 10_000.0), torch.randn(B, T, C)
    sdpa, seen = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or sdpa(q, k, v, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        q, k, v = (proj(x).view(B, T, H, C // H) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))  # bf16
    assert seen == [(torch.float32,) * 3]
    positions = torch.arange(T)[:, None]
    q, k = attn.rope(q.float(), positions), attn.rope(k.float(), positions)  # fp32 in, fp32 out: never rounded
    by_hand = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.float().transpose(1, 2), is_causal=True).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_hand = attn.output_proj(by_hand.transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(out, by_hand, atol=0, rtol=0)


@pytest.mark.parametrize("leading", [(6,), (2, 3)], ids=["3-D", "4-D"])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_matches_torch(leading, masked):
    torch.manual_seed(0)
    Q, K, V = torch.randn(*leading, 5, 8), torch.randn(*leading, 7, 8), torch.randn(*leading, 7, 6)
    mask = None
    if masked:
        mask = torch.rand(5, 7) > 0.4
        mask[:, 0] = True  # every query may attend somewhere (an all-masked row is NaN by definition)
    out = scaled_dot_product_attention(Q, K, V, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(Q, K, V, attn_mask=mask))
    if masked:  # masked keys get exactly zero weight: changing them changes nothing
        V2 = V.clone()
        V2[..., ~mask[2], :] += 100.0
        torch.testing.assert_close(scaled_dot_product_attention(Q, K, V2, mask)[..., 2, :], out[..., 2, :])


def test_causal_mask_alignment():
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    # 2 new queries after 3 cached keys: positions 3 and 4 see keys 0..3 and 0..4 (bottom-right aligned).
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True] * 5]


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    theta, D, max_len = 10_000.0, 16, 64
    rope = RotaryPositionalEmbedding(theta, D, max_len)
    x = torch.randn(2, 3, 10, D)
    pos = torch.randint(0, max_len, (10,))
    # Independent implementation: pair (x[2k], x[2k+1]) is the complex number x[2k] + i x[2k+1], rotated by
    # multiplying with exp(i · pos · θ^(-2k/D)).
    freqs = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(10, D // 2, dtype=torch.float64), pos[:, None].double() * freqs)
    xc = torch.view_as_complex(x.double().reshape(2, 3, 10, D // 2, 2).contiguous())
    ref = torch.view_as_real(xc * rot).reshape(2, 3, 10, D).float()
    torch.testing.assert_close(rope(x, pos), ref, atol=1e-5, rtol=1e-5)
    # Per-batch positions (B, T) broadcast too.
    pos_b = torch.stack([pos, pos.flip(0)])  # (2, 10)
    out_b = rope(x[:, 0], pos_b)
    torch.testing.assert_close(out_b[1], rope(x[1, 0], pos.flip(0)))
    # Rotations preserve norms, and position 0 is the identity.
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rope(x, torch.zeros(10, dtype=torch.long)), x)
    assert "cos" not in rope.state_dict() and len(rope.state_dict()) == 0  # non-persistent cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_fast_path_equals_the_readable_reference(monkeypatch, dtype):
    # Eager forward runs _rotate_complex; under torch.compile the cos/sin lines run. Same values and gradients.
    torch.manual_seed(0)
    rope = RotaryPositionalEmbedding(10_000.0, 16, 64)
    x = torch.randn(2, 10, 3, 16).to(dtype).requires_grad_()
    pos = torch.randint(0, 64, (10, 1))  # (T, 1): broadcast over the heads, as the attention passes them
    fast = rope(x, pos)
    fast_grad, = torch.autograd.grad((fast.float() ** 2).sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ref = rope(x, pos)
    ref_grad, = torch.autograd.grad((ref.float() ** 2).sum(), x)
    assert fast.dtype == ref.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, ref, **tol)
    torch.testing.assert_close(fast_grad, ref_grad, **tol)


def test_attention_fused_equals_manual_outputs_and_grads():
    torch.manual_seed(0)
    fused = CausalMultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10_000.0, attn_impl="sdpa")
    manual = CausalMultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10_000.0, attn_impl="manual")
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(3, 16, 32, requires_grad=True)
    out_f, out_m = fused(x), manual(x)
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out_f)
    grads_f = torch.autograd.grad(out_f, [x, *fused.parameters()], g)
    grads_m = torch.autograd.grad(out_m, [x, *manual.parameters()], g)
    for a, b in zip(grads_f, grads_m):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_attention_without_rope_is_permutation_equivariant_in_keys():
    # NoPE: with no position information, the last query's output ignores the order of the tokens before it.
    torch.manual_seed(0)
    attn = CausalMultiHeadSelfAttention(32, 4)  # theta=None: no RoPE
    assert attn.rope is None
    x = torch.randn(1, 6, 32)
    perm = torch.cat([torch.randperm(5), torch.tensor([5])])
    torch.testing.assert_close(attn(x)[:, -1], attn(x[:, perm])[:, -1], atol=1e-5, rtol=1e-5)


def test_block_pre_norm_is_two_residual_lines():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 48, 16, 10_000.0)
    x = torch.randn(2, 16, 32)
    h = x + block.attn(block.ln1(x))
    torch.testing.assert_close(block(x), h + block.ffn(block.ln2(h)))


def test_block_post_norm_and_no_norm():
    torch.manual_seed(0)
    post = TransformerBlock(32, 4, 48, 16, 10_000.0, norm="post")
    x = torch.randn(2, 16, 32)
    h = post.ln1(x + post.attn(x))  # Vaswani et al.: normalise after each residual add
    torch.testing.assert_close(post(x), post.ln2(h + post.ffn(h)))
    bare = TransformerBlock(32, 4, 48, 16, 10_000.0, norm="none")
    bare.load_state_dict(post.state_dict(), strict=False)  # same attn/ffn weights, no gains
    h = x + bare.attn(x)
    torch.testing.assert_close(bare(x), h + bare.ffn(h))
    assert not any("ln" in k for k in bare.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# The whole model


def test_state_dict_keys_are_the_cs336_layout():
    lm = small_lm()
    assert list(lm.state_dict().keys()) == expected_keys(SMALL["num_layers"])
    assert lm.state_dict()["layers.0.attn.q_proj.weight"].shape == (32, 32)
    assert lm.state_dict()["layers.0.ffn.w2.weight"].shape == (32, 48)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parameter_count_equals_formula(name):
    cfg = PRESETS[name]
    with torch.device("meta"):  # no memory, no init time
        lm = TransformerLM(**dataclasses.asdict(cfg))
    n = sum(p.numel() for p in lm.parameters())
    assert n == count_formula(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                              cfg.d_ff)
    assert lm.config == cfg


def test_logits_shape_dtype_and_init_loss():
    lm = small_lm()
    ids = torch.randint(0, 97, (3, 32))
    logits = lm(ids)
    assert logits.shape == (3, 32, 97) and logits.dtype == torch.float32
    # At init the prediction is near uniform: loss ≈ ln V.
    loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert abs(loss.item() - math.log(97)) < 0.5


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_causality(attn_impl):
    lm = small_lm(attn_impl=attn_impl)
    ids = torch.randint(0, 97, (2, 20))
    t = 11
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    a, b = lm(ids), lm(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3  # and token t itself does change its own logits


def test_fused_and_manual_models_agree_outputs_and_grads():
    fused = small_lm(attn_impl="sdpa")
    manual = small_lm(attn_impl="manual")
    manual.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 97, (2, 32))
    out_f, out_m = fused(ids), manual(ids)
    torch.testing.assert_close(out_f, out_m, atol=1e-5, rtol=1e-5)
    F.cross_entropy(out_f.flatten(0, 1), ids.flatten()).backward()
    F.cross_entropy(out_m.flatten(0, 1), ids.flatten()).backward()
    for (name, p), q in zip(fused.named_parameters(), manual.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_state_dict_round_trip_gives_identical_logits(tmp_path):
    a, b = small_lm(seed=0), small_lm(seed=1)
    torch.save(a.state_dict(), tmp_path / "sd.pt")
    b.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    ids = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(a(ids), b(ids), atol=0, rtol=0)


def test_config_round_trip_and_presets():
    cfg = ModelConfig(**{**SMALL, "norm": "post", "ffn": "silu", "tie_embeddings": True})
    lm = TransformerLM(**dataclasses.asdict(cfg))
    assert lm.config == cfg
    assert dataclasses.asdict(PRESETS["tiny"])["d_ff"] == 688
    assert (PRESETS["ts17m"].d_model, PRESETS["ts17m"].num_heads, PRESETS["ts17m"].d_ff) == (512, 16, 1344)


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=30), "divisible by num_heads"),
    (dict(num_heads=16, d_model=48), "even head dim"),  # head dim 3
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(norm="layernorm"), "unknown norm"),
    (dict(position="alibi"), "unknown position"),
    (dict(ffn="gelu"), "unknown ffn"),
    (dict(attn_impl="flash"), "unknown attn_impl"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        TransformerLM(**{**SMALL, **bad})


def test_nope_allows_odd_head_dim():
    lm = TransformerLM(**{**SMALL, "d_model": 12, "num_heads": 4, "position": "nope"})  # head dim 3, no RoPE
    assert lm(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_input_checks():
    lm = small_lm()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        lm(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        lm(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds context_length 32"):
        lm(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        lm(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        lm(torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# Ablations


ABLATIONS = {
    "no_norm": dict(norm="none"),
    "post_norm": dict(norm="post"),
    "nope": dict(position="nope"),
    "silu_ffn": dict(ffn="silu", d_ff=4 * SMALL["d_model"]),
    "tied": dict(tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_ablation_builds_trains_and_changes_exactly_what_it_should(name):
    kw = ABLATIONS[name]
    lm = small_lm(**kw)
    cfg = lm.config
    ids = torch.randint(0, 97, (2, 16))
    logits = lm(ids)
    assert logits.shape == (2, 16, 97) and torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())

    n = sum(p.numel() for p in lm.parameters())
    assert n == count_formula(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads,
                              cfg.d_ff, norm=cfg.norm, ffn=cfg.ffn, tie=cfg.tie_embeddings)
    assert list(lm.state_dict().keys()) == expected_keys(cfg.num_layers, norm=cfg.norm, ffn=cfg.ffn)
    base = small_lm()
    n_base = sum(p.numel() for p in base.parameters())
    C, L, V = SMALL["d_model"], SMALL["num_layers"], SMALL["vocab_size"]
    expected_delta = {
        "no_norm": -(2 * L * C + C),  # every ln1, ln2 and ln_final gone
        "post_norm": 0,  # the same three kinds of norm, only where they sit changes
        "nope": 0,  # RoPE has no parameters (its cos/sin cache is a non-persistent buffer)
        "silu_ffn": L * (2 * C * 4 * C - 3 * C * SMALL["d_ff"]),  # two C x 4C matrices instead of three C x F
        "tied": -V * C,  # one matrix fewer
    }[name]
    assert n - n_base == expected_delta


def test_nope_removes_rope_and_changes_outputs():
    rope_lm, nope_lm = small_lm(), small_lm(position="nope")
    nope_lm.load_state_dict(rope_lm.state_dict())  # identical keys and weights; only the positions differ
    assert all(layer.attn.rope is None for layer in nope_lm.layers)
    ids = torch.randint(0, 97, (1, 16))
    assert not torch.allclose(rope_lm(ids), nope_lm(ids))


def test_tied_embeddings_share_one_tensor():
    lm = small_lm(tie_embeddings=True)
    assert lm.lm_head.weight is lm.token_embeddings.weight
    sd = lm.state_dict()
    # Both keys are present (PyTorch keeps every name of a shared tensor) and point to the same storage.
    assert sd["lm_head.weight"].data_ptr() == sd["token_embeddings.weight"].data_ptr()
    assert len(list(lm.parameters())) == len(sd) - 1
    # One update moves both uses.
    ids = torch.randint(0, 97, (2, 8))
    F.cross_entropy(lm(ids).flatten(0, 1), ids.flatten()).backward()
    with torch.no_grad():
        lm.lm_head.weight.sub_(lm.lm_head.weight.grad)
    torch.testing.assert_close(lm.token_embeddings.weight, lm.lm_head.weight, atol=0, rtol=0)
    # A tied state dict loads into a fresh tied model and still shares.
    other = small_lm(seed=3, tie_embeddings=True)
    other.load_state_dict(lm.state_dict())
    assert other.lm_head.weight is other.token_embeddings.weight
    torch.testing.assert_close(other(ids), lm(ids), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 1, 4], [3, 4, 5], [12]],
                         ids=["one-by-one", "prefill-then-steps", "multi-token-prefills", "single-prefill"])
@pytest.mark.parametrize("position", ["rope", "nope"])
def test_kv_cache_logits_equal_full_sequence(attn_impl, chunks, position):
    lm = small_lm(attn_impl=attn_impl, position=position)
    ids = torch.randint(0, 97, (2, sum(chunks)))
    full = lm(ids)
    cache, start, outs = KVCache(), 0, []
    for n in chunks:
        outs.append(lm(ids[:, start:start + n], kv_cache=cache))
        start += n
        assert cache.seq_len == start
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(cache.keys) == SMALL["num_layers"] and cache.keys[0].shape == (2, 4, start, 8)


def test_kv_cache_limits():
    lm = small_lm()
    cache = KVCache()
    lm(torch.zeros(2, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cache has 30 \\+ 3 new.*exceeds context_length 32"):
        lm(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    assert cache.seq_len == 30  # a refused call leaves the cache untouched
    with pytest.raises(ValueError, match="batch size 1 differs"):
        lm(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    lm(torch.zeros(2, 2, dtype=torch.long), kv_cache=cache)
    assert cache.seq_len == 32


# ---------------------------------------------------------------------------------------------------------------------
# Training end to end, autocast, CLI


def test_tiny_model_overfits_one_batch():
    from optim import AdamW, cross_entropy

    torch.manual_seed(0)
    lm = TransformerLM(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))  # random targets: only memorisation brings the loss down
    opt = AdamW(lm.parameters(), lr=1e-2, weight_decay=0.0, foreach=True)
    for step in range(300):
        loss = cross_entropy(lm(x), y)
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step} steps"


def test_bf16_autocast_forward_backward():
    lm = small_lm()
    ids = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), lm(ids), atol=0.1, rtol=0.05)
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad.dtype == torch.float32 for p in lm.parameters())


def test_cli_runs_and_rejects_bad_config(capsys):
    from model import main

    main(["--norm", "none", "--ffn", "silu"])
    out = capsys.readouterr().out
    assert "parameters:" in out and "d_ff=1024" in out  # silu picks 4*d_model
    with pytest.raises(SystemExit) as exit_info:
        main(["--d-ff", "0"])
    assert exit_info.value.code == 2  # argparse's usage error: one line, no traceback
    assert "d_ff must be a positive integer" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# ModelConfig.with_overrides: the one path from flags to a config (model.py, accounting.py, train.py)


def test_with_overrides_replaces_given_fields_and_owns_the_silu_rule():
    tiny = PRESETS["tiny"]
    assert tiny.with_overrides(norm=None, d_model=None) == tiny                     # None = the flag was not given
    assert tiny.with_overrides(norm="post").norm == "post"
    assert tiny.with_overrides(ffn="silu").d_ff == 4 * 256                          # SiLU without d_ff: 4 * d_model
    assert tiny.with_overrides(ffn="silu", d_model=64, num_heads=4).d_ff == 4 * 64  # of the new d_model
    assert tiny.with_overrides(ffn="silu", d_ff=100).d_ff == 100                    # an explicit d_ff wins
    silu = dataclasses.replace(tiny, ffn="silu", d_ff=500)
    assert silu.with_overrides(ffn="silu").d_ff == 500                              # already SiLU: kept
    with pytest.raises(ValueError, match="unknown model field"):
        tiny.with_overrides(width=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        tiny.with_overrides(num_heads=7)                                            # validated


@pytest.mark.parametrize("script, argv, message", [
    ("model.py", ["--preset", "huge"], "invalid choice: 'huge'"),
    ("model.py", ["--ffn", "relu"], "invalid choice: 'relu'"),
    ("optim.py", ["--steps", "0"], "--steps must be positive"),
])
def test_model_and_optim_cli_errors_are_one_line_exit_2(script, argv, message):
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / script), *argv], capture_output=True, text=True, cwd=root)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{script}: error: ") and message in done.stderr
