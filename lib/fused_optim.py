"""optim.py's fast path (the speed layer behind its switches): what train.py and bench/ run, tested equal to the
readable chapter code in tests/test_optim.py.

  cross_entropy(logits, targets)        optim.cross_entropy(..., fast=True): chunked fused softmax, gradient by hand
  adamw_foreach(group, params, state)   optim.AdamW(..., foreach=True): the update with torch._foreach_* ops
  adamw_fused(group, params, state)     optim.AdamW(..., fused=True): the update in torch's fused AdamW kernel
  clip_divisor(params, max_norm)        clipping folded into the fused step: (‖g‖, d) for AdamW.step(grad_divisor=d)

A lower-floor module of lib/: it imports no chapter and needs only torch. The AdamW functions take the parameter
group, the parameters that have a gradient and the optimizer's state (optim.AdamW keeps it: "step", "m", "v" per
parameter, the same entries on every path, so a checkpoint written by one path resumes on any other).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------------------------------
# Cross-entropy: chunked fused softmax with the gradient in closed form


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """optim.cross_entropy's loss through _CrossEntropy: logits (..., V), targets (...) int -> scalar (>= fp32)."""
    return _CrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))  # (N, V), (N,)


class _CrossEntropy(torch.autograd.Function):
    """The loss with its gradient in closed form: ∂loss/∂o = (softmax(o) - onehot(y)) / N.

    Why by hand, and in chunks of rows: the (N, V) logits are the largest tensor of a small model's step (164 MB at
    N = 4096, V = 10,000). Autograd through the readable formula's ops makes ~16 passes over them and allocates
    several fresh (N, V) tensors (on CPU every fresh large allocation is page-faulted in again). Here the forward
    keeps nothing but the logits, each chunk's fp32 temporaries are small enough to stay in cache, and the backward
    recomputes softmax(o) chunk by chunk straight into the one gradient tensor it must return.
    Each chunk goes through torch's fused log_softmax (forward) and softmax (backward): one kernel that takes the
    max, the exps and their sum in a vectorised sweep over the row, reading 16-bit logits as they are, where the
    readable formula is five passes (cast, max, subtract, exp, sum). The same max-subtracted sums inside, so the same
    stability for huge logits (tests/test_optim.py).
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
# AdamW: the same update as optim.AdamW's loop, for a whole parameter group at once


def adamw_foreach(group: dict, params: list[Tensor], state: dict, grad_divisor: Tensor | None = None) -> None:
    """optim.AdamW's lines with torch._foreach_* ops: one kernel launch per op for the whole list of tensors.
    state[p] holds "step" (already counted for this step), "m" and "v"; grad_divisor: divide the gradients first."""
    if not params:
        return
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    if grad_divisor is not None:
        torch._foreach_div_(grads, grad_divisor)  # g ← g / d, the clipping handed in (clip_divisor)
    ms = [state[p]["m"] for p in params]
    vs = [state[p]["v"] for p in params]
    steps = [state[p]["step"] for p in params]
    torch._foreach_mul_(ms, beta1)  # m ← β1 m ...
    torch._foreach_add_(ms, grads, alpha=1 - beta1)  # ... + (1 - β1) g
    torch._foreach_mul_(vs, beta2)  # v ← β2 v ...
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)  # ... + (1 - β2) g²
    neg_alphas = [-lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]  # -α_t per tensor
    torch._foreach_mul_(params, 1 - lr * wd)  # θ ← θ - α λ θ
    denoms = torch._foreach_sqrt(vs)  # sqrt(v)
    torch._foreach_add_(denoms, eps)  # sqrt(v) + ε
    torch._foreach_addcdiv_(params, ms, denoms, neg_alphas)  # θ ← θ - α_t m / (sqrt(v) + ε)


def adamw_fused(group: dict, params: list[Tensor], state: dict, grad_divisor: Tensor | None = None) -> None:
    """The same update in torch's fused AdamW kernel (torch._fused_adamw_, what torch.optim.AdamW(fused=True) runs),
    which reads θ, g, m, v once and writes θ, m, v once per element. Why faster: the readable lines each make a pass
    over memory (~8 for the foreach path, plus a temporary for sqrt(v)); the update is memory-bound, so one pass wins.

    The kernel computes torch's form of the step, θ ← θ - α/(1 - β1^t) · m / (sqrt(v)/sqrt(1 - β2^t) + ε'). With
    ε' = ε / sqrt(1 - β2^t) that is exactly ours (multiply the fraction through by sqrt(1 - β2^t)): ε is added to
    sqrt(v), not to sqrt(v̂). Its moment and decay lines are ours as written (m by lerp, the same value). note: the
    kernel reads t from a tensor per parameter and takes one ε', so it is called once per (t, device, dtype).
    grad_divisor (clip_divisor's d) goes in as the kernel's grad_scale, what torch's GradScaler unscales by:
    g ← g / grad_scale, divided as the kernel reads each gradient and written back (the same bits as dividing first,
    one pass fewer). A DTensor divisor (FSDP) cannot go into the kernel: the gradients are divided first instead.
    """
    if grad_divisor is not None and params and not _plain(grad_divisor):
        torch._foreach_div_([p.grad for p in params], grad_divisor)
        grad_divisor = None
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    calls: dict[tuple, list[Tensor]] = {}
    for p in params:
        calls.setdefault((state[p]["step"], p.device, p.dtype), []).append(p)
    for (t, device, _), ps in calls.items():
        step = torch.tensor(float(t), device=device)  # the kernel's t: a float tensor on the parameters' device
        scale = None if grad_divisor is None else grad_divisor.to(device=device, dtype=torch.float32)
        torch._fused_adamw_(ps, [p.grad for p in ps], [state[p]["m"] for p in ps],
                            [state[p]["v"] for p in ps], [], [step] * len(ps), lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=wd, eps=eps / math.sqrt(1 - beta2**t), amsgrad=False,
                            maximize=False, grad_scale=scale,
                            found_inf=None if scale is None else torch.zeros((), device=device))


# --------------------------------------------------------------------------------------------------------------------
# Clipping folded into the fused step


def clip_divisor(params: Iterable[torch.nn.Parameter], max_norm: float,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(‖g‖, d): the gradients' global norm and what optim.clip_grad_norm scales them by, as a divisor
    d = max(1, (‖g‖ + eps) / max_norm) (None if no parameter has a gradient). A training loop hands d to
    AdamW.step(grad_divisor=d), whose fused kernel divides as it updates: one pass over the gradients fewer
    (train.train_step)."""
    grads = [p.grad for p in params if p.grad is not None]
    return _norm_and_divisor(grads, max_norm, eps) if grads else (torch.tensor(0.0), None)


def _plain(t: Tensor) -> bool:
    """True for a plain tensor, False for a DTensor (FSDP's sharded gradients and what is computed from them)."""
    return not hasattr(t, "full_tensor")


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
