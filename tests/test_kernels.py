"""Tests for lib/kernels.py, model.py's fast path (`TransformerLM(..., fast=True)`): each kernel against its
readable twin in model.py (values and gradients, fp32/float64 exactly or to float rounding, bf16 within a stated
tolerance, the torch.compile fallbacks too); the whole fast model against the plain one, forward and every
parameter's gradient, for every ablation combination, under CPU bf16 autocast and while decoding with a KV cache;
and that the plain model runs no torch.nn.functional kernel and no custom autograd Function, while the fast one does.

    python -m pytest tests/test_kernels.py
"""
import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

from lib import kernels
from lib.kernels import _SwiGLUGate
from model import (CausalMultiHeadSelfAttention, Embedding, KVCache, RMSNorm, RotaryPositionalEmbedding, SiLUFFN,
                   SwiGLU, TransformerLM)

SMALL = dict(vocab_size=97, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48, rope_theta=10_000.0)


def plain_and_fast(seed=0, **overrides) -> tuple[TransformerLM, TransformerLM]:
    """The same small model twice, with the same weights: fast=False and fast=True."""
    torch.manual_seed(seed)
    plain = TransformerLM(**{**SMALL, **overrides})
    fast = TransformerLM(**{**SMALL, **overrides}, fast=True)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def assert_near(actual, expected, tol, msg=None):
    """|actual - expected| <= tol · max|expected|: agreement to `tol` of the tensor's scale (the kernels add in
    another order, so float32 results differ in their last bits, more so for large entries)."""
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=0, msg=msg)


# ---------------------------------------------------------------------------------------------------------------------
# Each kernel against the readable module


def test_embedding_index_select_equals_indexing_gradients_too():
    torch.manual_seed(0)
    plain = Embedding(1000, 64, dtype=torch.float64)
    fast = Embedding(1000, 64, dtype=torch.float64, fast=True)
    fast.load_state_dict(plain.state_dict())
    ids = torch.tensor([[5, 5, 9], [5, 0, 9]])
    assert torch.equal(fast(ids), plain(ids))
    dy = torch.randn(2, 3, 64, dtype=torch.float64)
    # the gradient (index_select's index_add_) equals plain indexing's, repeated ids summed
    grad, = torch.autograd.grad(fast(ids), fast.weight, dy)
    ref, = torch.autograd.grad(plain(ids), plain.weight, dy)
    torch.testing.assert_close(grad, ref)
    assert torch.equal(grad[5], dy[0, 0] + dy[0, 1] + dy[1, 0])


@pytest.mark.parametrize("shape", [(2, 5, 64), (7, 64), "transposed"])
def test_rmsnorm_hand_written_backward_equals_autograd_of_the_readable_formula(shape):
    # fast=True runs _RMSNormFunction (its gradient written out); fast=False is the formula autograd differentiates.
    torch.manual_seed(0)
    plain = RMSNorm(64).double()
    with torch.no_grad():
        plain.weight.copy_(torch.randn(64))
    fast = RMSNorm(64, fast=True).double()
    fast.load_state_dict(plain.state_dict())
    if shape == "transposed":  # a non-contiguous input (backward flattens its rows with reshape, not view)
        x = (torch.randn(5, 2, 64, dtype=torch.float64) * 3).transpose(0, 1).requires_grad_()
        shape = x.shape
    else:
        x = (torch.randn(*shape, dtype=torch.float64) * 3).requires_grad_()
    dy = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(fast(x), plain(x))
    grads_fast = torch.autograd.grad(fast(x), (x, fast.weight), dy)
    grads_plain = torch.autograd.grad(plain(x), (x, plain.weight), dy)
    torch.testing.assert_close(grads_fast, grads_plain)
    assert torch.autograd.gradcheck(fast, (x,))  # and against finite differences
    # bf16 in (autocast's case): the gradient comes back in bf16, the fp32 one rounded.
    fast, plain = fast.float(), plain.float()
    xb = x.detach().bfloat16().requires_grad_()
    x32 = xb.detach().float().requires_grad_()
    grad_bf16, = torch.autograd.grad(fast(xb), xb, dy.bfloat16())
    grad_fp32, = torch.autograd.grad(plain(x32), x32, dy.bfloat16().float())
    assert grad_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(grad_bf16, grad_fp32.bfloat16(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_swiglu_gate_hand_written_backward_equals_autograd_of_the_product(dtype):
    # SwiGLU(fast=True) runs _SwiGLUGate (SiLU(a) ⊙ b, gradient written out, SiLU(a) recomputed): against
    # `F.silu(a) * b`.
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
    ffn = SwiGLU(16, 40, fast=True).to(dtype)  # the module takes this path and matches the readable formula
    x = torch.randn(2, 5, 16, dtype=dtype)
    ref = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("cls", [SwiGLU, SiLUFFN])
def test_fast_ffns_equal_the_readable_ones(cls):
    torch.manual_seed(0)
    plain = cls(16, 40).double()
    fast = cls(16, 40, fast=True).double()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), plain(x))
    dy = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(fast(x), [x, *fast.parameters()], dy),
                               torch.autograd.grad(plain(x), [x, *plain.parameters()], dy))


@pytest.mark.parametrize("head_dim", [32, 128])
def test_fused_attention_computes_16_bit_cpu_attention_in_fp32_up_to_head_dim_64(head_dim):
    # kernels.fused_attention: on CPU in bf16 with head dim <= 64, F.sdpa on the fp32 inputs rounded back (torch's
    # 16-bit CPU kernel is slower there); at 128 the bf16 kernel itself. Gradients come back in bf16 either way.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, head_dim).bfloat16().requires_grad_() for _ in range(3))
    out = kernels.fused_attention(q, k, v, is_causal=True)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fp32 if head_dim <= 64 else bf16, atol=0, rtol=0)
    torch.testing.assert_close(out, bf16, atol=2e-2, rtol=2e-2)  # the same attention, up to bf16 rounding
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside autocast too (which would cast fp32 inputs back)
        torch.testing.assert_close(kernels.fused_attention(q, k, v, is_causal=True), out, atol=0, rtol=0)
    x = torch.randn(2, 3, 16, head_dim)  # fp32: torch's kernel, untouched
    torch.testing.assert_close(kernels.fused_attention(x, x, x), F.scaled_dot_product_attention(x, x, x),
                               atol=0, rtol=0)


def test_attention_hands_rope_output_to_fp32_attention_unrounded(monkeypatch):
    # Under CPU bf16 autocast with head dim <= 64 fused_attention computes in fp32, so RoPE passes q and k on in
    # fp32 instead of rounding them to bf16 for attention to cast back: the result is that computation, exactly.
    torch.manual_seed(0)
    B, T, C, H = 2, 16, 32, 2
    attn, x = CausalMultiHeadSelfAttention(C, H, T, 10_000.0, fast=True), torch.randn(B, T, C)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_complex_fast_path_equals_the_readable_rotation(dtype):
    # fast=True runs kernels.rope's complex multiply; fast=False the cos/sin lines. Same values and gradients.
    torch.manual_seed(0)
    plain = RotaryPositionalEmbedding(10_000.0, 16, 64)
    fast = RotaryPositionalEmbedding(10_000.0, 16, 64, fast=True)
    x = torch.randn(2, 10, 3, 16).to(dtype).requires_grad_()
    pos = torch.randint(0, 64, (10, 1))  # (T, 1): broadcast over the heads, as the attention passes them
    out_fast, out_plain = fast(x, pos), plain(x, pos)
    grad_fast, = torch.autograd.grad((out_fast.float() ** 2).sum(), x)
    grad_plain, = torch.autograd.grad((out_plain.float() ** 2).sum(), x)
    assert out_fast.dtype == out_plain.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_fast, out_plain, **tol)
    torch.testing.assert_close(grad_fast, grad_plain, **tol)
    assert len(fast.state_dict()) == 0  # cos, sin and rotations are non-persistent buffers


def test_kernels_under_torch_compile_fall_back_to_the_readable_ops(monkeypatch):
    # Under torch.compile the kernels run the readable formulas (compile fuses them): the very ops of fast=False.
    torch.manual_seed(0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(2, 10, 3, 16)
    pos = torch.randint(0, 64, (10, 1))
    rope_plain, rope_fast = (RotaryPositionalEmbedding(10_000.0, 16, 64, fast=f) for f in (False, True))
    assert torch.equal(rope_fast(x, pos), rope_plain(x, pos))
    norm_plain, norm_fast = RMSNorm(16), RMSNorm(16, fast=True)
    with torch.no_grad():
        norm_plain.weight.copy_(torch.randn(16))
    norm_fast.load_state_dict(norm_plain.state_dict())
    assert torch.equal(norm_fast(x), norm_plain(x))
    assert torch.equal(norm_fast(x.bfloat16()), norm_plain(x.bfloat16()))
    xg = x.clone().requires_grad_()  # the same autograd graph too: the readable lines ran, not the kernels
    assert rope_fast(xg, pos).grad_fn.name() == rope_plain(xg, pos).grad_fn.name() == "AddBackward0"
    assert norm_fast(xg).grad_fn.name() == norm_plain(xg).grad_fn.name() == "MulBackward0"
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    assert kernels.swiglu_gate(a, b).grad_fn.name() == "MulBackward0"  # autograd's product, not _SwiGLUGate


# ---------------------------------------------------------------------------------------------------------------------
# The whole model: fast == plain


ABLATION_GRID = list(itertools.product(("pre", "post", "none"), ("rope", "nope"), ("swiglu", "silu"), (False, True),
                                       ("sdpa", "manual")))


def _forward_backward(lm, ids):
    logits = lm(ids)
    logits.float().square().mean().backward()
    return logits, {name: p.grad for name, p in lm.named_parameters()}


@pytest.mark.parametrize("norm, position, ffn, tie, attn_impl", ABLATION_GRID)
def test_fast_model_equals_plain_model_fp32_forward_and_every_gradient(norm, position, ffn, tie, attn_impl):
    plain, fast = plain_and_fast(norm=norm, position=position, ffn=ffn, tie_embeddings=tie, attn_impl=attn_impl)
    ids = torch.randint(0, 97, (2, 32))
    logits_plain, grads_plain = _forward_backward(plain, ids)
    logits_fast, grads_fast = _forward_backward(fast, ids)
    # fp32: to 2e-6 of each tensor's largest entry (a few float32 ulps; the kernels sum in another order)
    assert_near(logits_fast, logits_plain, 2e-6)
    assert grads_fast.keys() == grads_plain.keys()
    for name in grads_plain:
        assert_near(grads_fast[name], grads_plain[name], 2e-6, msg=name)


@pytest.mark.parametrize("norm, position, ffn, tie, attn_impl", ABLATION_GRID)
def test_fast_model_equals_plain_model_under_bf16_autocast(norm, position, ffn, tie, attn_impl):
    # Under CPU bf16 autocast both paths run the matmuls in bf16 but round in different places (the fast attention
    # and RoPE compute in fp32, the plain ones in bf16). Stated tolerance: the difference's norm is within 5% of
    # the plain tensor's norm, for the logits and every gradient (bf16 keeps 8 significant bits, 0.4%; compounded
    # over two layers and backward the worst case of this grid is 2.6%).
    plain, fast = plain_and_fast(norm=norm, position=position, ffn=ffn, tie_embeddings=tie, attn_impl=attn_impl)
    ids = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_plain, grads_plain = _forward_backward(plain, ids)
        logits_fast, grads_fast = _forward_backward(fast, ids)
    assert logits_plain.dtype == logits_fast.dtype == torch.bfloat16
    pairs = [("logits", logits_fast.float(), logits_plain.float())]
    pairs += [(name, grads_fast[name], grads_plain[name]) for name in grads_plain]
    for name, actual, expected in pairs:
        assert actual.dtype == torch.float32
        assert (actual - expected).norm() <= 0.05 * expected.norm(), name


@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("position", ["rope", "nope"])
def test_fast_model_equals_plain_model_decoding_with_a_kv_cache(attn_impl, position):
    plain, fast = plain_and_fast(attn_impl=attn_impl, position=position)
    ids = torch.randint(0, 97, (2, 14))
    caches = KVCache(), KVCache()
    start = 0
    for n in (5, 1, 1, 3, 1, 1, 2):  # a prefill, single steps, and several tokens after a cache
        chunk = ids[:, start:start + n]
        with torch.no_grad():
            out_plain, out_fast = plain(chunk, kv_cache=caches[0]), fast(chunk, kv_cache=caches[1])
        assert_near(out_fast, out_plain, 2e-6)
        start += n
    assert caches[0].seq_len == caches[1].seq_len == 14
    for k_plain, k_fast in zip(caches[0].keys, caches[1].keys):
        assert_near(k_fast, k_plain, 2e-6)


def test_fast_is_a_run_time_switch_not_part_of_the_config_or_state_dict():
    plain, fast = plain_and_fast()
    assert plain.config == fast.config and "fast" not in vars(plain.config)
    assert list(plain.state_dict()) == list(fast.state_dict())
    assert fast.fast and all(m.fast for m in fast.modules() if hasattr(m, "fast"))
    assert not plain.fast and not any(m.fast for m in plain.modules() if hasattr(m, "fast"))
    fast_arg = inspect.signature(TransformerLM).parameters["fast"]
    assert fast_arg.kind == inspect.Parameter.KEYWORD_ONLY and fast_arg.default is False


# ---------------------------------------------------------------------------------------------------------------------
# The plain model runs the chapter's code only


FUSED_OPS = ("scaled_dot_product", "aten::silu", "index_select", "view_as_complex", "silu_backward")


def _ops_and_autograd_nodes(lm):
    """The aten ops a forward + backward of lm runs (torch.profiler) and the autograd nodes of its graph."""
    ids = torch.randint(0, 97, (2, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss = lm(ids).square().mean()
        loss.backward()
    ops = {event.name for event in prof.events()}
    nodes, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        todo += [next_node for next_node, _ in node.next_functions]
    return ops, nodes


def test_plain_model_runs_no_fused_kernel_and_no_custom_autograd_function():
    plain, fast = plain_and_fast()
    ops, nodes = _ops_and_autograd_nodes(plain)
    assert not [op for op in ops if any(fused in op for fused in FUSED_OPS)]
    assert not [n for n in nodes if isinstance(n, torch.autograd.function.BackwardCFunction)]
    assert "aten::sigmoid" in ops and "aten::masked_fill" in ops  # the chapter's silu and attention ran
    # The fast model does run them: the check can see them.
    ops, nodes = _ops_and_autograd_nodes(fast)
    assert any("scaled_dot_product" in op for op in ops) and "aten::silu" in ops and "aten::index_select" in ops
    custom = {type(n).__name__ for n in nodes if isinstance(n, torch.autograd.function.BackwardCFunction)}
    assert custom == {"_RMSNormFunctionBackward", "_SwiGLUGateBackward"}
