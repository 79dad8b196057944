"""Loss and optimisation for CS336 assignment 1 (handout §4), from scratch: cross-entropy, AdamW, the cosine
learning-rate schedule and global gradient-norm clipping.

AdamW subclasses `torch.optim.Optimizer` only for its parameter-group and state-dict bookkeeping; the update itself
is written out below, once as a plain per-parameter loop (the reference), once with `torch._foreach_*` multi-tensor
ops (`foreach=True`) and once through torch's fused AdamW kernel (`fused=True`, the fastest), all tested equal to each
other and to `torch.optim.AdamW`.

    python optim.py                          # the handout's SGD learning-rate toy (§4.2): lr 1e1, 1e2, 1e3
    python -m pytest tests/test_optim.py

Layers: cli -> bpe -> model, optim -> accounting -> train -> sample; optim.py needs only torch (and cli.py's parser).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lib.cli import OneLineParser


# --------------------------------------------------------------------------------------------------------------------
# Cross-entropy (handout §4.1)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over all positions of -log softmax(logits)[target]; logits (..., V), targets (...) int -> scalar.

    -log(exp(o_y) / Σ_j exp(o_j)) = logsumexp(o) - o_y, and logsumexp(o) = m + log Σ_j exp(o_j - m) with
    m = max_j o_j (cross_entropy_reference below writes it out). note: never form exp(o) itself: exp(1e4) overflows
    to inf (and inf/inf = NaN); after subtracting the max every exp is in (0, 1] and the sum is in [1, V], so the
    loss is finite for any finite logits. Always computed in (at least) fp32: bf16 logits from autocast would lose
    digits in the sum. The gradient is written out by hand in _CrossEntropy.backward (tested against finite
    differences, the reference and F.cross_entropy).
    """
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (N, V), (N,)


def cross_entropy_reference(logits: Tensor, targets: Tensor) -> Tensor:
    """The readable definition, op by op (autograd differentiates it): the same loss as cross_entropy."""
    o = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    m = o.amax(dim=-1, keepdim=True)  # (N, 1): the row max
    logsumexp = m + torch.log((o - m).exp().sum(dim=-1, keepdim=True))  # (N, 1), each exp in (0, 1]
    return (logsumexp - o.gather(-1, targets.reshape(-1, 1))).mean()  # mean of logsumexp(o) - o_y


class _CrossEntropy(torch.autograd.Function):
    """The loss above with its gradient in closed form: ∂loss/∂o = (softmax(o) - onehot(y)) / N.

    Why by hand, and in chunks of rows: the (N, V) logits are the largest tensor of a small model's step (164 MB at
    N = 4096, V = 10,000). Autograd through the reference's ops makes ~16 passes over them and allocates several
    fresh (N, V) tensors (on CPU every fresh large allocation is page-faulted in again). Here the forward keeps
    nothing but the logits, each chunk's fp32 temporaries are small enough to stay in cache, and the backward
    recomputes softmax(o) chunk by chunk straight into the one gradient tensor it must return.
    Each chunk goes through torch's fused log_softmax (forward) and softmax (backward): one kernel that takes the
    max, the exps and their sum in a vectorised sweep over the row, reading 16-bit logits as they are, where the
    reference's formula is five passes (cast, max, subtract, exp, sum). note: ts17m's (2048, 10000) bf16 logits,
    forward 15.8 -> 9.8 ms, backward 16.6 -> 11.3 ms (BENCHMARKS.md). The same max-subtracted sums inside, so
    the same stability for huge logits (tests/test_optim.py).
    """

    CPU_CHUNK_BYTES = 2_560_000  # fp32 temporaries per chunk on CPU: 64 rows at V = 10,000, cache-sized
    GPU_CHUNK_BYTES = 2**30

    @staticmethod
    def rows_per_chunk(logits: Tensor) -> int:
        # note: small chunks pay on CPU (cache), but each chunk also costs a few op launches, so a chunk is a byte
        # budget, not a row count (a small vocab gets few, long chunks: V = 256 is 2,500 rows). On a GPU launches
        # are all that counts, so there the chunks are as big as a 1 GiB fp32 temporary allows.
        budget = _CrossEntropy.CPU_CHUNK_BYTES if logits.device.type == "cpu" else _CrossEntropy.GPU_CHUNK_BYTES
        return max(1, budget // (4 * logits.shape[-1]))

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        N, R = logits.shape[0], _CrossEntropy.rows_per_chunk(logits)
        acc = torch.promote_types(logits.dtype, torch.float32)  # at least fp32 (float64 stays float64)
        log_p = torch.empty(N, 1, dtype=acc, device=logits.device)  # (N, 1): log softmax(o)_y = o_y - logsumexp(o)
        for i in range(0, N, R):
            chunk = torch.log_softmax(logits[i:i + R], dim=-1, dtype=acc)  # (R, V): o - logsumexp(o), in fp32
            log_p[i:i + R] = chunk.gather(-1, targets[i:i + R, None])  # (R, 1)
        ctx.save_for_backward(logits, targets)
        return -log_p.sum() / N  # mean over the N positions of logsumexp(o) - o_y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        logits, targets = ctx.saved_tensors
        N, R = logits.shape[0], _CrossEntropy.rows_per_chunk(logits)
        acc = torch.promote_types(logits.dtype, torch.float32)
        grad_logits = torch.empty_like(logits)  # (N, V), in the logits' dtype
        for i in range(0, N, R):
            p = torch.softmax(logits[i:i + R], dim=-1, dtype=acc)  # (R, V): softmax(o), in fp32
            # subtle: subtract the one-hot in fp32, before any cast: in bf16, 1 - 0.999 would round to 0.
            p[torch.arange(p.shape[0], device=p.device), targets[i:i + R]] -= 1.0  # softmax(o) - onehot(y)
            grad_logits[i:i + R] = p.mul_(grad / N)  # / N for the mean, times the upstream gradient
        return grad_logits, None


# --------------------------------------------------------------------------------------------------------------------
# AdamW (Loshchilov & Hutter 2019; handout §4.3, Algorithm 1)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay. Per parameter θ with gradient g, at step t = 1, 2, ...:

        m ← β1 m + (1 - β1) g                 first-moment (mean) estimate
        v ← β2 v + (1 - β2) g²                second-moment (uncentred variance) estimate
        α_t ← α sqrt(1 - β2^t) / (1 - β1^t)   bias correction of m and v, folded into the step size
        θ ← θ - α λ θ                          decoupled weight decay (not part of the gradient, so Adam's
                                               per-coordinate scaling never touches it)
        θ ← θ - α_t m / (sqrt(v) + ε)         the Adam step

    note: the handout writes the decay after the Adam step; we apply it to θ_{t-1} first, as Loshchilov & Hutter's
    Algorithm 2 (line 12) and torch.optim.AdamW do. The two differ by α²λ·(step) per iteration, ~1e-8 at α = 1e-3.
    note: ε is added to sqrt(v), not to sqrt(v̂) as torch does; the effective ε differs by sqrt(1 - β2^t), which
    only matters while sqrt(v̂) is as small as ε.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, foreach: bool = False, fused: bool = False):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if foreach and fused:
            raise ValueError("choose one fast path: foreach=True or fused=True, not both")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # load_state_dict keeps the saved groups: older ones had no "fused" entry
            group.setdefault("fused", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, grad_divisor: Tensor | None = None):
        """One update of every parameter that has a gradient. grad_divisor (clip_divisor's d): divide the gradients
        by it first, as clip_grad_norm would; the fused path does that inside its kernel, which divides each
        gradient as it reads it and writes it back (the same bits as dividing first, one pass fewer)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:  # lazy init, so state_dict() of a fresh optimizer is empty, like torch's
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            in_kernel = group["fused"] and grad_divisor is not None and _plain(grad_divisor)  # a DTensor: not in it
            if grad_divisor is not None and params and not in_kernel:
                torch._foreach_div_([p.grad for p in params], grad_divisor)
            if group["fused"]:
                self._step_fused(group, params, grad_divisor if in_kernel else None)
            elif group["foreach"]:
                self._step_foreach(group, params)
            else:
                self._step_loop(group, params)
        return loss

    def _step_loop(self, group: dict, params: list[Tensor]) -> None:
        """The reference: one parameter at a time, one line per line of the algorithm."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            g, state = p.grad, self.state[p]
            m, v, t = state["m"], state["v"], state["step"]
            m.mul_(beta1).add_(g, alpha=1 - beta1)  # m ← β1 m + (1 - β1) g
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v ← β2 v + (1 - β2) g²
            alpha_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)  # α_t ← α sqrt(1 - β2^t) / (1 - β1^t)
            p.mul_(1 - lr * wd)  # θ ← θ - α λ θ
            p.addcdiv_(m, v.sqrt().add_(eps), value=-alpha_t)  # θ ← θ - α_t m / (sqrt(v) + ε)

    def _step_foreach(self, group: dict, params: list[Tensor]) -> None:
        """The same lines with torch._foreach_* ops: one kernel launch per op for the whole list of tensors."""
        if not params:
            return
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        ms = [self.state[p]["m"] for p in params]
        vs = [self.state[p]["v"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        torch._foreach_mul_(ms, beta1)  # m ← β1 m ...
        torch._foreach_add_(ms, grads, alpha=1 - beta1)  # ... + (1 - β1) g
        torch._foreach_mul_(vs, beta2)  # v ← β2 v ...
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)  # ... + (1 - β2) g²
        neg_alphas = [-lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]  # -α_t per tensor
        torch._foreach_mul_(params, 1 - lr * wd)  # θ ← θ - α λ θ
        denoms = torch._foreach_sqrt(vs)  # sqrt(v)
        torch._foreach_add_(denoms, eps)  # sqrt(v) + ε
        torch._foreach_addcdiv_(params, ms, denoms, neg_alphas)  # θ ← θ - α_t m / (sqrt(v) + ε)

    def _step_fused(self, group: dict, params: list[Tensor], grad_divisor: Tensor | None = None) -> None:
        """The same update in torch's fused AdamW kernel (torch._fused_adamw_, what torch.optim.AdamW(fused=True)
        runs), which reads θ, g, m, v once and writes θ, m, v once per element. Why faster: the lines above each make
        a pass over memory (~8 for the foreach path, plus a temporary for sqrt(v)); at 23M parameters the update is
        memory-bound, and the one pass is ~4x quicker on CPU.

        The kernel computes torch's form of the step, θ ← θ - α/(1 - β1^t) · m / (sqrt(v)/sqrt(1 - β2^t) + ε'). With
        ε' = ε / sqrt(1 - β2^t) that is exactly ours (multiply the fraction through by sqrt(1 - β2^t)): ε is added to
        sqrt(v), not to sqrt(v̂). Its moment and decay lines are ours as written (m by lerp, the same value). note: the
        kernel reads t from a tensor per parameter and takes one ε', so it is called once per (t, device, dtype).
        grad_divisor goes in as the kernel's grad_scale, what torch's GradScaler unscales by: g ← g / grad_scale.
        """
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        calls: dict[tuple, list[Tensor]] = {}
        for p in params:
            calls.setdefault((self.state[p]["step"], p.device, p.dtype), []).append(p)
        for (t, device, _), ps in calls.items():
            step = torch.tensor(float(t), device=device)  # the kernel's t: a float tensor on the parameters' device
            scale = None if grad_divisor is None else grad_divisor.to(device=device, dtype=torch.float32)
            torch._fused_adamw_(ps, [p.grad for p in ps], [self.state[p]["m"] for p in ps],
                                [self.state[p]["v"] for p in ps], [], [step] * len(ps), lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=wd, eps=eps / math.sqrt(1 - beta2**t), amsgrad=False,
                                maximize=False, grad_scale=scale,
                                found_inf=None if scale is None else torch.zeros((), device=device))


# --------------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (handout §4.4): linear warmup, cosine decay, constant floor


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """The learning rate at iteration `it` (0-based).

    it < warmup_iters:                        max_lr · it / warmup_iters            (linear warmup from 0)
    warmup_iters ≤ it ≤ cosine_cycle_iters:   min_lr + ½(1 + cos(π · progress))(max_lr - min_lr),
                                              progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    it > cosine_cycle_iters:                  min_lr
    note: cosine_cycle_iters is the absolute iteration where the decay ends (the handout's T_c), not a length.
    """
    if cosine_cycle_iters < warmup_iters:
        raise ValueError(f"cosine_cycle_iters ({cosine_cycle_iters}) must be >= warmup_iters ({warmup_iters})")
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it > cosine_cycle_iters:
        return min_lr
    if cosine_cycle_iters == warmup_iters:  # a zero-length cosine: the boundary iteration is the peak
        return max_lr
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)  # 0 at the peak, 1 at the floor
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


# --------------------------------------------------------------------------------------------------------------------
# Gradient clipping (handout §4.5)


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients by one factor so that their global L2 norm is at most max_norm; return the norm before.

    One norm over ALL parameters (‖g‖ = sqrt(Σ_p ‖g_p‖²)), not one per tensor, so clipping keeps the direction of
    the full gradient. The factor is max_norm / (‖g‖ + eps) when ‖g‖ > max_norm (eps guards against 0/0), applied
    as a division by its inverse, clip_divisor's d.
    note: the norm comes back as a 0-dim tensor on the gradients' device, not a float: reading it (`.item()`,
    `float()`) waits for the GPU, so a training loop does that only on the steps it logs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm, divisor = _norm_and_divisor(grads, max_norm, eps)
    torch._foreach_div_(grads, divisor)
    return total_norm


def _plain(t: Tensor) -> bool:
    """True for a plain tensor, False for a DTensor (FSDP's sharded gradients and what is computed from them)."""
    return not hasattr(t, "full_tensor")


def clip_divisor(params: Iterable[torch.nn.Parameter], max_norm: float,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(‖g‖, d): the gradients' global norm and what clip_grad_norm divides them by, d = max(1, (‖g‖ + eps) /
    max_norm) (None if no parameter has a gradient). A training loop hands d to AdamW.step(grad_divisor=d), whose
    fused kernel divides as it updates: the same bits, one pass over the gradients fewer (train.train_step)."""
    grads = [p.grad for p in params if p.grad is not None]
    return _norm_and_divisor(grads, max_norm, eps) if grads else (torch.tensor(0.0), None)


def _norm_and_divisor(grads: list[Tensor], max_norm: float, eps: float) -> tuple[Tensor, Tensor]:
    """clip_divisor's (‖g‖, d) for a non-empty list of gradients."""
    # one call for the whole list (as torch's clip_grad_norm_ does), not one op launch per tensor; fp32 accumulation
    per_tensor = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))  # (n_tensors,) ‖g_p‖
    total_norm = torch.linalg.vector_norm(per_tensor)  # () sqrt(Σ_p ‖g_p‖²)
    # max(1, (‖g‖ + eps) / max_norm) as a tensor: always dividing avoids a data-dependent branch (and a sync).
    divisor = ((total_norm + eps) / max_norm).clamp(min=1.0).to(grads[0].dtype)
    # FSDP-sharded gradients are DTensors, and so is everything computed from them above, the norm included (summed
    # over the ranks' shards by DTensor itself); the norm goes back as a plain tensor, the same on every rank, the
    # divisor as what the gradients are, to divide them.
    return (total_norm if _plain(total_norm) else total_norm.full_tensor()), divisor


# --------------------------------------------------------------------------------------------------------------------
# CLI: the handout's SGD learning-rate toy (§4.2)


class SGD(torch.optim.Optimizer):
    """The handout's example optimizer: θ_{t+1} = θ_t - α / sqrt(t + 1) · ∇L(θ_t) (decaying SGD)."""

    def __init__(self, params, lr: float = 1e-3):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state.get("t", 0)  # iteration number, from 0
                p.add_(p.grad, alpha=-group["lr"] / math.sqrt(t + 1))  # θ ← θ - α/sqrt(t+1) · g
                state["t"] = t + 1
        return loss


def sgd_toy(lr: float, steps: int = 10, seed: int = 0) -> list[float]:
    """Minimise mean(θ²) for a random 10x10 θ with SGD at `lr`; return the loss at each step."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter(5 * torch.randn((10, 10), generator=generator))
    opt = SGD([weights], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (weights**2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
    return losses


def main(argv=None) -> None:
    parser = OneLineParser(prog="optim.py", description="The handout's SGD learning-rate toy: minimise mean(θ²) at 3 lrs.")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    for lr in (1e1, 1e2, 1e3):
        losses = sgd_toy(lr, args.steps)
        if losses[-1] > losses[0]:
            verdict = "diverges (the step overshoots the minimum by more than it started from)"
        elif losses[-1] < 1e-6 * losses[0]:
            verdict = "converges fast"
        else:
            verdict = "decays slowly"
        print(f"lr {lr:g}: " + " ".join(f"{x:.3g}" for x in losses) + f"  -> {verdict}")


if __name__ == "__main__":
    main()
