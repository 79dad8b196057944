"""Tests for optim.py and its speed layer lib/fused_optim.py against PyTorch: cross_entropy, plain and fast=True, vs
F.cross_entropy (values and gradients, 2-D and 3-D, fp32/bf16/fp64, logits of 1e4 stay finite) and vs each other;
AdamW's three paths (the plain loop, foreach=True, fused=True) vs torch.optim.AdamW over 100 steps (≤ 1e-6, several
groups, with weight decay) and vs each other (a parameter without a gradient, bf16 parameters, grad_divisor); AdamW
state_dict round-trips (resume == uninterrupted run), across paths and from older state dicts; cosine_lr at its
boundary iterations and the handout's values; clip_grad_norm vs torch.nn.utils.clip_grad_norm_ and vs clip_divisor's
divisor (the clipping folded into the fused step); the SGD learning-rate toy's behaviours.

    python -m pytest tests/test_optim.py            # these tests (all fast)
    python -m pytest -m slow                       # the slow end-to-end checks of the whole suite
"""
import math

import pytest
import torch
import torch.nn.functional as F

from lib import fused_optim
from lib.fused_optim import _CrossEntropy, clip_divisor
from optim import AdamW, clip_grad_norm, cosine_lr, cross_entropy, sgd_toy


# ---------------------------------------------------------------------------------------------------------------------
# cross_entropy


FAST = pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])  # cross_entropy's two paths


@FAST
@pytest.mark.parametrize("shape", [(12,), (3, 5)], ids=["2-D logits", "3-D logits"])
def test_cross_entropy_matches_torch_values_and_grads(shape, fast):
    torch.manual_seed(0)
    V = 11
    logits = torch.randn(*shape, V, requires_grad=True)
    targets = torch.randint(0, V, shape)
    ours = cross_entropy(logits, targets, fast=fast)
    ref = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)


def test_cross_entropy_default_is_the_readable_formula():
    # The chapter's lines run unless fast=True: autograd differentiates them (no hand-written backward in the graph).
    logits, targets = torch.randn(4, 7, requires_grad=True), torch.randint(0, 7, (4,))
    assert "_CrossEntropy" not in type(cross_entropy(logits, targets).grad_fn).__name__
    assert "_CrossEntropy" in type(cross_entropy(logits, targets, fast=True).grad_fn).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cross_entropy_fast_equals_plain(dtype):
    # The fast path (lib/fused_optim.py: torch's fused log_softmax / softmax per chunk, the hand-written gradient)
    # against the chapter's formula differentiated by autograd, and both against F.cross_entropy; huge logits too,
    # where a sum without the max would overflow.
    torch.manual_seed(0)
    logits = (torch.randn(70, 13) * 6).to(dtype)
    logits[0, 3], logits[1] = 1e4, -1e4
    targets = torch.randint(0, 13, (70,))
    acc = torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.to(acc), targets))
    fast_logits, plain_logits = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fast, plain = cross_entropy(fast_logits, targets, fast=True), cross_entropy(plain_logits, targets)
    assert fast.dtype == plain.dtype == acc
    torch.testing.assert_close(fast, plain)
    fast.backward()
    plain.backward()
    assert fast_logits.grad.dtype == plain_logits.grad.dtype == dtype
    torch.testing.assert_close(fast_logits.grad, plain_logits.grad)


def test_cross_entropy_hand_written_gradient_passes_gradcheck():
    # The fast path's closed-form backward against finite differences, in float64; 300 rows so that several chunks
    # are used.
    torch.manual_seed(0)
    logits = torch.randn(300, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (300,))
    assert torch.autograd.gradcheck(lambda o: cross_entropy(o, targets, fast=True), (logits,))


def test_cross_entropy_chunks_match_one_shot(monkeypatch):
    # Rows split across chunks (N not a multiple of the chunk size) give exactly F.cross_entropy's values and grads.
    monkeypatch.setattr(_CrossEntropy, "CPU_CHUNK_BYTES", 64 * 50 * 4)  # 64 rows of V = 50 per chunk
    assert _CrossEntropy.rows_per_chunk(torch.empty(303, 50)) == 64
    torch.manual_seed(0)
    logits = (torch.randn(3, 101, 50) * 5).requires_grad_()  # N = 303 rows
    targets = torch.randint(0, 50, (3, 101))
    ours = cross_entropy(logits, targets, fast=True)
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(ref, logits)[0])


@FAST
def test_cross_entropy_is_stable_for_huge_logits(fast):
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], requires_grad=True)
    targets = torch.tensor([1, 2])
    loss = cross_entropy(logits, targets, fast=fast)
    assert torch.isfinite(loss)
    # by hand: row 0 has loss 1e4 - 0 = 1e4 (up to e^-1e4); row 1 has ln 2 (two equal maxima)
    torch.testing.assert_close(loss, torch.tensor((1e4 + math.log(2)) / 2))
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@FAST
def test_cross_entropy_bf16_logits_computed_in_fp32(fast):
    torch.manual_seed(0)
    logits = (torch.randn(8, 50) * 4).bfloat16()
    targets = torch.randint(0, 50, (8,))
    logits.requires_grad_()
    loss = cross_entropy(logits, targets, fast=fast)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets))
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), torch.func.grad(
        lambda o: F.cross_entropy(o, targets))(logits.detach().float()), atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------------------------------------------------
# AdamW


def make_problem(seed=0):
    """A small least-squares model with O(1) gradients and parameters of several shapes."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(8, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g)),
              torch.nn.Parameter(torch.randn(3, 8, generator=g))]
    data = [(torch.randn(16, 3, generator=g), torch.randn(16, 5, generator=g)) for _ in range(100)]

    def loss_fn(params, step):
        x, y = data[step]
        w0, b, w1 = params
        h = torch.tanh(x @ w1) @ w0 + b  # (16, 3) @ (3, 8) -> (16, 8) @ (8, 5) -> (16, 5)
        return ((h - y) ** 2).mean()

    return params, loss_fn


def run(opt_factory, steps=100, seed=0, groups=False):
    params, loss_fn = make_problem(seed)
    if groups:  # two groups with their own hyperparameters, as train.py may use (no decay on gains)
        opt = opt_factory([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}])
    else:
        opt = opt_factory(params)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    return params, opt


IMPLS = {"loop": {}, "foreach": dict(foreach=True), "fused": dict(fused=True)}  # AdamW's three code paths


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("groups", [False, True], ids=["one group", "two groups"])
def test_adamw_matches_torch_over_100_steps(impl, groups):
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, _ = run(lambda p: AdamW(p, **IMPLS[impl], **kw), groups=groups)
    ref, _ = run(lambda p: torch.optim.AdamW(p, **kw), groups=groups)
    start, _ = make_problem()
    for a, b, s in zip(ours, ref, start):
        assert (a - s).abs().max() > 1e-2  # the parameters really moved
        assert (a - b).abs().max().item() <= 1e-6


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_fast_paths_equal_loop(impl):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    loop, loop_opt = run(lambda p: AdamW(p, **kw), steps=50)
    fast, fast_opt = run(lambda p: AdamW(p, **IMPLS[impl], **kw), steps=50)
    for a, b in zip(loop, fast):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    for sa, sb in zip(loop_opt.state.values(), fast_opt.state.values()):
        assert sa["step"] == sb["step"] == 50
        torch.testing.assert_close(sa["m"], sb["m"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(sa["v"], sb["v"], atol=1e-7, rtol=1e-6)


def test_adamw_default_runs_the_plain_loop(monkeypatch):
    # AdamW(params) runs the chapter's loop; the speed layer only when asked for (foreach=True / fused=True).
    def refuse(*args):
        raise AssertionError("the default path called lib/fused_optim.py")

    monkeypatch.setattr(fused_optim, "adamw_foreach", refuse)
    monkeypatch.setattr(fused_optim, "adamw_fused", refuse)
    params, loss_fn = make_problem()
    opt = AdamW(params)
    assert [(g["foreach"], g["fused"]) for g in opt.param_groups] == [(False, False)]
    loss_fn(params, 0).backward()
    opt.step(grad_divisor=torch.tensor(2.0))


@pytest.mark.parametrize("divided", [False, True], ids=["no divisor", "grad_divisor"])
def test_adamw_three_paths_equal_torch_with_a_frozen_param_and_grad_divisor(divided):
    # The plain loop, foreach and fused against each other and torch.optim.AdamW: two groups, weight decay, a
    # parameter that never gets a gradient (skipped: no state, unchanged), with and without grad_divisor (torch's
    # AdamW is handed the gradients divided beforehand).
    d = torch.tensor(3.0) if divided else None
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    results = {}
    for impl in [*IMPLS, "torch"]:
        params, loss_fn = make_problem()
        frozen = torch.nn.Parameter(torch.ones(4))
        groups = [{"params": params[:2] + [frozen]}, {"params": params[2:], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, **kw) if impl == "torch" else AdamW(groups, **IMPLS[impl], **kw)
        for step in range(30):
            opt.zero_grad()
            loss_fn(params, step).backward()
            if impl == "torch" and divided:
                for p in params:
                    p.grad.div_(d)
            opt.step() if impl == "torch" else opt.step(grad_divisor=d)
        assert torch.equal(frozen, torch.ones(4)) and frozen not in opt.state
        results[impl] = params
    for impl in IMPLS:
        for a, b in zip(results[impl], results["torch"]):
            assert (a - b).abs().max().item() <= 1e-6
        for a, b in zip(results[impl], results["loop"]):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_adamw_bf16_params(impl):
    # bf16 parameters (and so bf16 m, v): every path matches torch.optim.AdamW's same path (fused: the same kernel,
    # bit for bit; the loop and foreach within 2 bf16 ulps of the largest value, 2^-7 relative each: torch's loop
    # writes the bias corrections differently), and the three paths agree within 4 such ulps: the loop and foreach
    # round θ, m, v to bf16 after each op, the fused kernel once per element.
    def bf16_run(factory):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 5, generator=g).bfloat16()),
                  torch.nn.Parameter(torch.randn(5, generator=g).bfloat16())]
        opt = factory(params)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()
        return params

    kw = dict(lr=1e-2, weight_decay=0.1)
    ours = bf16_run(lambda p: AdamW(p, **IMPLS[impl], **kw))
    torch_kw = dict(IMPLS[impl]) or dict(foreach=False)
    ref = bf16_run(lambda p: torch.optim.AdamW(p, **torch_kw, **kw))
    loop = bf16_run(lambda p: AdamW(p, **kw))
    for a, b, c in zip(ours, ref, loop):
        assert a.dtype == torch.bfloat16
        if impl == "fused":
            assert torch.equal(a, b)
        else:
            assert (a.float() - b.float()).abs().max() <= 2**-6 * b.float().abs().max()
        assert (a.float() - c.float()).abs().max() <= 2**-5 * c.float().abs().max()


def test_adamw_weight_decay_is_decoupled():
    # With a zero gradient Adam's step is 0, so only the decay acts: θ ← (1 - αλ) θ exactly.
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_adamw_state_dict_round_trip(tmp_path, impl):
    kw = dict(lr=1e-2, weight_decay=0.1, **IMPLS[impl])
    uninterrupted, _ = run(lambda p: AdamW(p, **kw), steps=20)

    params, loss_fn = make_problem()
    opt = AdamW(params, **kw)
    for step in range(10):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    params2, _ = make_problem(seed=1)  # different starting values: everything must come from the checkpoint
    with torch.no_grad():
        for p, saved in zip(params2, ckpt["params"]):
            p.copy_(saved)
    opt2 = AdamW(params2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state_dict()["state"][0]["step"] == 10
    for step in range(10, 20):
        opt2.zero_grad()
        loss_fn(params2, step).backward()
        opt2.step()
    for a, b in zip(params2, uninterrupted):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_adamw_lr_set_through_param_groups():
    # train.py sets group["lr"] from the schedule every step; lr 0 with no decay must leave θ unchanged.
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=1e-2)
    for group in opt.param_groups:
        group["lr"] = 0.0
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.ones(4), atol=0, rtol=0)


@pytest.mark.parametrize("saved_with,resumed_with", [(a, b) for a in sorted(IMPLS) for b in sorted(IMPLS) if a != b])
def test_adamw_state_dict_resumes_on_another_path(tmp_path, saved_with, resumed_with):
    # One state dict format on every path ("step" an int, "m", "v"): a checkpoint written with one resumes with any
    # other (train.py writes with fused=True; `--plain` resumes with the loop), and the resumed optimizer keeps its
    # own path, not the checkpoint's.
    kw = dict(lr=1e-2, weight_decay=0.1)
    uninterrupted, _ = run(lambda p: AdamW(p, **IMPLS[saved_with], **kw), steps=20)
    params, loss_fn = make_problem()
    opt = AdamW(params, **IMPLS[saved_with], **kw)
    for step in range(10):
        opt.zero_grad()
        loss_fn(params, step).backward()
        opt.step()
    saved = opt.state_dict()
    assert sorted(saved["state"][0]) == ["m", "step", "v"] and type(saved["state"][0]["step"]) is int
    torch.save(saved, tmp_path / "opt.pt")
    opt2 = AdamW(params, **IMPLS[resumed_with], **kw)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt2.param_groups[0]["fused"] == (resumed_with == "fused")
    assert opt2.param_groups[0]["foreach"] == (resumed_with == "foreach")
    for step in range(10, 20):
        opt2.zero_grad()
        loss_fn(params, step).backward()
        opt2.step()
    assert opt2.state_dict()["state"][0]["step"] == 20
    for a, b in zip(params, uninterrupted):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)


def test_adamw_loads_a_state_dict_saved_before_the_fused_path():
    # optimizer state in checkpoints written before fused=True existed has no "fused" key in its groups; it loads,
    # and the optimizer keeps the path it was built with (here the plain loop, though the checkpoint's was foreach)
    params, loss_fn = make_problem()
    opt = AdamW(params, foreach=True)
    loss_fn(params, 0).backward()
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["fused"]
    opt2 = AdamW(params)
    opt2.load_state_dict(old)
    assert [(g["foreach"], g["fused"]) for g in opt2.param_groups] == [(False, False)]
    assert opt2.state[params[0]]["step"] == 1
    opt2.step()
    assert opt2.state[params[0]]["step"] == 2


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2))]
    for kw, msg in ((dict(lr=-1.0), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
                    (dict(weight_decay=-0.1), "weight_decay"), (dict(foreach=True, fused=True), "one fast")):
        with pytest.raises(ValueError, match=msg):
            AdamW(p, **kw)


# ---------------------------------------------------------------------------------------------------------------------
# cosine_lr


def test_cosine_lr_boundaries():
    max_lr, min_lr, warm, cycle = 1.0, 0.1, 7, 21
    assert cosine_lr(0, max_lr, min_lr, warm, cycle) == 0.0  # warmup starts from 0
    assert cosine_lr(3, max_lr, min_lr, warm, cycle) == pytest.approx(3 / 7)
    assert cosine_lr(warm, max_lr, min_lr, warm, cycle) == pytest.approx(max_lr)  # peak at the end of warmup
    assert cosine_lr(14, max_lr, min_lr, warm, cycle) == pytest.approx((max_lr + min_lr) / 2)  # halfway down
    assert cosine_lr(cycle, max_lr, min_lr, warm, cycle) == pytest.approx(min_lr)  # T_c is absolute
    assert cosine_lr(cycle + 1, max_lr, min_lr, warm, cycle) == min_lr
    assert cosine_lr(10_000, max_lr, min_lr, warm, cycle) == min_lr
    lrs = [cosine_lr(it, max_lr, min_lr, warm, cycle) for it in range(30)]
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # rising through warmup
    assert all(a > b for a, b in zip(lrs[warm:cycle], lrs[warm + 1:cycle + 1]))  # falling through the cosine


def test_cosine_lr_matches_handout_reference_values():
    # The handout's test values (CS336 tests/test_optimizer.py: max 1, min 0.1, warmup 7, cycle 21).
    expected = [0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
                0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885,
                0.9018241671106134, 0.8305704108364301, 0.7452476826029011, 0.6501344202803414, 0.55,
                0.44986557971965857, 0.3547523173970989, 0.26942958916356996, 0.19817583288938662,
                0.14456400944391146, 0.11128243951817937, 0.1, 0.1, 0.1, 0.1]
    got = [cosine_lr(it, 1.0, 0.1, 7, 21) for it in range(25)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_edge_cases():
    assert cosine_lr(0, 1.0, 0.1, 0, 10) == 1.0  # no warmup: start at the peak
    assert cosine_lr(5, 1.0, 0.1, 5, 5) == 1.0  # zero-length cosine
    assert cosine_lr(6, 1.0, 0.1, 5, 5) == 0.1
    with pytest.raises(ValueError, match="cosine_cycle_iters"):
        cosine_lr(0, 1.0, 0.1, 10, 5)


# ---------------------------------------------------------------------------------------------------------------------
# clip_grad_norm


def params_with_grads() -> list[torch.nn.Parameter]:
    """Three seeded parameters, the first two with gradients (norm well above 0.5), the third without."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(3))]
    for p in params[:2]:
        p.grad = torch.randn_like(p) * 3
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "untouched"])
def test_clip_grad_norm_matches_torch(max_norm):
    params = params_with_grads()
    # params[2] has no gradient: it is skipped, as torch does
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(ref, params):
        r.grad = None if p.grad is None else p.grad.clone()
    total = clip_grad_norm(params, max_norm)
    ref_total = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert isinstance(total, torch.Tensor) and total.dim() == 0  # a tensor: no host sync until someone reads it
    total = total.item()
    assert total == pytest.approx(ref_total.item(), rel=1e-6)
    for a, b in zip(params[:2], ref[:2]):
        torch.testing.assert_close(a.grad, b.grad)
    new_norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in params[:2]))
    if max_norm < total:
        assert new_norm == pytest.approx(max_norm, rel=1e-5)  # one global scale: the norm lands on max_norm
    else:
        assert new_norm == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipped", "untouched"])
def test_clip_grad_norm_equals_clip_divisor_applied(max_norm):
    # The readable clipping (one sum of squares, a factor) and lib/fused_optim.clip_divisor's (‖g‖, d) (foreach
    # norms, a divisor): the same norm, and gradients scaled by the factor == gradients divided by d.
    params = params_with_grads()
    norm, d = clip_divisor(params, max_norm)
    divided = [p.grad / d for p in params[:2]]
    total = clip_grad_norm(params, max_norm)
    torch.testing.assert_close(total, norm, atol=0, rtol=1e-6)
    assert (d.item() > 1) == (max_norm == 0.5)
    for p, g in zip(params[:2], divided):
        torch.testing.assert_close(p.grad, g)
    assert params[2].grad is None
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0).item() == 0.0  # no gradients: nothing to clip


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_clipping_as_grad_divisor_equals_clip_then_step(impl):
    # train.py hands clip_divisor's d to AdamW.step(grad_divisor=d) instead of clipping and then stepping: the fused
    # kernel divides as it updates, the other paths divide first. The same bits as dividing by d and then stepping,
    # with the clip active; and the same values as the readable clip_grad_norm followed by a step.
    params, loss_fn = make_problem()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    readable = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **IMPLS[impl])
    opt, twin_opt, readable_opt = AdamW(params, **kw), AdamW(twins, **kw), AdamW(readable, **kw)
    for step in range(20):
        for ps, o in ((params, opt), (twins, twin_opt), (readable, readable_opt)):
            o.zero_grad()
            loss_fn(ps, step).backward()
        norm, d = clip_divisor(params, 0.05)
        assert d.item() == pytest.approx((norm.item() + 1e-6) / 0.05, rel=1e-6) and d.item() > 1  # clipped
        opt.step(grad_divisor=d)
        twin_norm, twin_d = clip_divisor(twins, 0.05)
        assert torch.equal(twin_norm, norm) and torch.equal(twin_d, d)
        for p in twins:
            p.grad.div_(twin_d)
        twin_opt.step()
        for a, b in zip(params, twins):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad)  # p.grad ends up divided in both
        torch.testing.assert_close(clip_grad_norm(readable, 0.05), norm, atol=0, rtol=1e-6)
        readable_opt.step()
        for a, b in zip(params, readable):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert clip_divisor([torch.nn.Parameter(torch.ones(2))], 1.0) == (torch.tensor(0.0), None)  # no gradients


# ---------------------------------------------------------------------------------------------------------------------
# The SGD learning-rate toy (python optim.py)


def test_sgd_toy_three_behaviours():
    slow, fast, diverge = sgd_toy(1e1), sgd_toy(1e2), sgd_toy(1e3)
    assert all(a > b for a, b in zip(slow, slow[1:])) and slow[-1] > 1e-2 * slow[0]  # decays, but slowly
    assert fast[-1] < 1e-12 * fast[0]  # converges fast
    assert diverge[-1] > 1e6 * diverge[0]  # diverges


def test_optim_cli_prints_the_toy(capsys):
    from optim import main

    main([])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["lr 10", "lr 100", "lr 1000"]
    assert "slowly" in lines[0] and "fast" in lines[1] and "diverges" in lines[2]
