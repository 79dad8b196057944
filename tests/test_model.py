"""Tests for model.py: every from-scratch module against its PyTorch built-in (F.linear, F.embedding, F.rms_norm,
torch.softmax, F.scaled_dot_product_attention, F.silu) or an independent implementation (RoPE via complex numbers),
on the plain path and the fast one (fast=True, lib/kernels.py; tests/test_kernels.py holds the two equal); the
whole model's state-dict keys, parameter count formula, causality, fused-vs-manual attention (outputs and
gradients), the KV cache (cached logits == full-sequence logits, every attention path, any chunking), every
ablation's parameters and keys, input checks, a tiny model overfitting one batch, and the handout's rule on
model.py's and optim.py's own text (no torch.nn.functional, no torch.optim but Optimizer, no private torch._ ops).

    python -m pytest tests/test_model.py            # these tests (all fast)
    python -m pytest -m slow                       # the slow end-to-end checks of the whole suite
"""
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (PRESETS, CausalMultiHeadSelfAttention, Embedding, KVCache, Linear, ModelConfig, RMSNorm,
                   RotaryPositionalEmbedding, SiLUFFN, SwiGLU, TransformerBlock, TransformerLM, causal_mask,
                   scaled_dot_product_attention, silu, softmax)

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.mark.parametrize("fast", [False, True])
def test_embedding_matches_f_embedding_and_init(fast):
    torch.manual_seed(0)
    emb = Embedding(1000, 64, fast=fast)
    ids = torch.randint(0, 1000, (3, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb(ids).shape == (3, 7, 64)
    # the gradient equals F.embedding's, repeated ids summed
    ids = torch.tensor([[5, 5, 9], [5, 0, 9]])
    dy = torch.randn(2, 3, 64, dtype=torch.float64)
    emb64 = Embedding(1000, 64, dtype=torch.float64, fast=fast)
    weight = emb64.weight
    grad, = torch.autograd.grad(emb64(ids), weight, dy)
    ref, = torch.autograd.grad(F.embedding(ids, weight), weight, dy)
    torch.testing.assert_close(grad, ref)
    assert torch.equal(grad[5], dy[0, 0] + dy[0, 1] + dy[1, 0])
    assert emb.weight.abs().max().item() <= 3.0
    assert abs(emb.weight.std().item() - 0.9866) < 0.02


@pytest.mark.parametrize("fast", [False, True])
def test_rmsnorm_matches_torch_and_upcasts(fast):
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5, fast=fast)
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


@pytest.mark.parametrize("fast", [False, True])
def test_silu_and_ffns_match_reference_formulas(fast):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(silu(x), F.silu(x))  # our definition is torch's fused kernel (the fast FFNs call it)
    torch.testing.assert_close(torch.autograd.grad(silu(x).sum(), x)[0], torch.autograd.grad(F.silu(x).sum(), x)[0])
    x = x.detach().float()
    ffn = SwiGLU(16, 40, fast=fast)
    assert (ffn.w1.weight.shape, ffn.w2.weight.shape, ffn.w3.weight.shape) == ((40, 16), (16, 40), (40, 16))
    ref = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), ref)
    plain = SiLUFFN(16, 64, fast=fast)
    assert not hasattr(plain, "w3")
    torch.testing.assert_close(plain(x), F.linear(F.silu(F.linear(x, plain.w1.weight)), plain.w2.weight))


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_softmax_matches_torch_including_large_inputs(scale):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5) * scale
    for dim in (0, 1, -1):
        out = softmax(x, dim)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.softmax(x, dim))


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


@pytest.mark.parametrize("fast", [False, True])
def test_rope_matches_complex_rotation(fast):
    torch.manual_seed(0)
    theta, D, max_len = 10_000.0, 16, 64
    rope = RotaryPositionalEmbedding(theta, D, max_len, fast=fast)
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


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_attention_fused_equals_manual_outputs_and_grads(attn_impl):
    # fast=True with attn_impl="sdpa" runs the fused kernel (and "manual" the chapter's attention after the fast
    # RoPE); the plain path (fast=False) always runs the chapter's scaled_dot_product_attention.
    torch.manual_seed(0)
    fused = CausalMultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10_000.0, attn_impl=attn_impl, fast=True)
    manual = CausalMultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10_000.0, attn_impl="sdpa")
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


PATHS = {"plain": dict(), "fast-sdpa": dict(fast=True), "fast-manual": dict(fast=True, attn_impl="manual")}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_causality(path):
    lm = small_lm(**PATHS[path])
    ids = torch.randint(0, 97, (2, 20))
    t = 11
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    a, b = lm(ids), lm(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3  # and token t itself does change its own logits


def test_fused_and_manual_models_agree_outputs_and_grads():
    fused = small_lm(attn_impl="sdpa", fast=True)
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


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 1, 4], [3, 4, 5], [12]],
                         ids=["one-by-one", "prefill-then-steps", "multi-token-prefills", "single-prefill"])
@pytest.mark.parametrize("position", ["rope", "nope"])
def test_kv_cache_logits_equal_full_sequence(path, chunks, position):
    lm = small_lm(**PATHS[path], position=position)
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


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_autocast_forward_backward(fast):
    lm = small_lm(fast=fast)
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
    done = subprocess.run([sys.executable, str(ROOT / script), *argv], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{script}: error: ") and message in done.stderr


# --------------------------------------------------------------------------------------------------------------------
# The handout's rule (§1, "What you can use"), on the chapters' own text


# What model.py and optim.py may not say: torch.nn.functional (imported or as `F.`), any torch.optim but the
# Optimizer base class, a private torch._ op. The speed layer that needs them lives in lib/.
FORBIDDEN = {"torch.nn.functional": re.compile(r"torch\.nn\.functional|\bnn\.functional\b|import\b.*\bfunctional\b"),
             "F. (torch.nn.functional)": re.compile(r"(?<![\w.])F\.\w"),
             "torch.optim other than torch.optim.Optimizer": re.compile(r"torch\.optim(?!\.Optimizer\b)|"
                                                                       r"from torch import\b.*\boptim\b"),
             "a private torch._ op": re.compile(r"torch\._\w")}


def forbidden_uses(text: str) -> list[str]:
    """'line N: what (the line)' for every use of a name the handout's rule forbids."""
    return [f"line {number}: {what}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            for what, pattern in FORBIDDEN.items() if pattern.search(line)]


def test_forbidden_uses_finds_each_forbidden_name():
    for bad in ("import torch.nn.functional as F", "y = F.silu(x)", "y = (F.gelu(x))",
                "from torch.nn import functional", "torch.optim.AdamW(params)", "from torch.optim import SGD",
                "from torch import nn, optim", "torch._foreach_mul_(xs, 2)", "torch._fused_adamw_(ps)"):
        assert forbidden_uses(bad), bad
    for fine in ("class AdamW(torch.optim.Optimizer):", "nn.Parameter(w)", "d_ff = F", "torch.utils.checkpoint",
                 "nn.init.trunc_normal_(w)", "FFN(x) = W2 SiLU(W1 x)"):
        assert not forbidden_uses(fine), fine


def test_model_py_obeys_the_handouts_rule_in_its_own_text():
    found = forbidden_uses((ROOT / "model.py").read_text(encoding="utf-8"))
    assert not found, "model.py uses what the handout's rule forbids (move it to lib/kernels.py):\n" + "\n".join(found)


def test_optim_py_obeys_the_handouts_rule_in_its_own_text():
    found = forbidden_uses((ROOT / "optim.py").read_text(encoding="utf-8"))
    assert not found, ("optim.py uses what the handout's rule forbids (issue 31: optim.py's owner moves it to "
                       "lib/fused_optim.py):\n" + "\n".join(found))
