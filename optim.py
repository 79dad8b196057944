"""Loss and optimisation for CS336 assignment 1 (handout §4), from scratch: cross-entropy (§4.1), the SGD example
(§4.2), AdamW (§4.3), the cosine learning-rate schedule (§4.4) and global gradient-norm clipping (§4.5).

The code below is what runs by default: `cross_entropy(logits, targets)` is the formula, `AdamW(params)` the
per-parameter loop of the algorithm box, `clip_grad_norm` one norm over all parameters. Each has a fast twin in
lib/fused_optim.py, chosen with one switch (`cross_entropy(..., fast=True)`, `AdamW(..., foreach=True)` or
`AdamW(..., fused=True)`) and tested equal to this code and to PyTorch; train.py and bench/ take the fast path.

    python optim.py                          # the handout's SGD learning-rate toy (§4.2): lr 1e1, 1e2, 1e3
    python -m pytest tests/test_optim.py

Layers: cli -> bpe -> model, optim -> accounting -> train -> sample; optim.py needs only torch, lib/cli.py's parser
and its speed layer lib/fused_optim.py (which imports no chapter).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lib import fused_optim
from lib.cli import OneLineParser


# --------------------------------------------------------------------------------------------------------------------
# Cross-entropy (handout §4.1)


def cross_entropy(logits: Tensor, targets: Tensor, fast: bool = False) -> Tensor:
    """Mean over all positions of -log softmax(logits)[target]; logits (..., V), targets (...) int -> scalar.

    -log(exp(o_y) / Σ_j exp(o_j)) = logsumexp(o) - o_y, and logsumexp(o) = m + log Σ_j exp(o_j - m) with
    m = max_j o_j. note: never form exp(o) itself: exp(1e4) overflows to inf (and inf/inf = NaN); after subtracting
    the max every exp is in (0, 1] and the sum is in [1, V], so the loss is finite for any finite logits. Always
    computed in (at least) fp32: bf16 logits from autocast would lose digits in the sum. Autograd differentiates
    these lines; the gradient is (softmax(o) - onehot(y)) / N.
    """
    if fast:  # lib/fused_optim.py: fused softmax in chunks, gradient by hand: fewer passes, only the logits saved
        return fused_optim.cross_entropy(logits, targets)
    o = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    m = o.amax(dim=-1, keepdim=True)  # (N, 1): the row max
    logsumexp = m + torch.log((o - m).exp().sum(dim=-1, keepdim=True))  # (N, 1), each exp in (0, 1]
    return (logsumexp - o.gather(-1, targets.reshape(-1, 1))).mean()  # mean of logsumexp(o) - o_y


# --------------------------------------------------------------------------------------------------------------------
# The handout's example optimizer (§4.2): SGD with a decaying step, and its learning-rate toy


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
    Algorithm 2 (line 12) and PyTorch's AdamW do. The two differ by α²λ·(step) per iteration, ~1e-8 at α = 1e-3.
    note: ε is added to sqrt(v), not to sqrt(v̂) as torch does; the effective ε differs by sqrt(1 - β2^t), which
    only matters while sqrt(v̂) is as small as ε.

    Optimizer (the base class) keeps the parameter groups and the state dict; the state per parameter is "step"
    (an int), "m" and "v" on every path, so a checkpoint written with one path resumes with any other. The path is
    the one chosen here, not the one a loaded state dict was saved with.
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, grad_divisor: Tensor | None = None):
        """One update of every parameter that has a gradient. grad_divisor (lib/fused_optim.clip_divisor's d):
        divide the gradients by it first, as clip_grad_norm would; the fused kernel does that as it reads them."""
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
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1  # t
            if group["fused"]:  # lib/fused_optim.py: torch's fused AdamW kernel, one pass over θ, g, m, v, not ~8
                fused_optim.adamw_fused(group, params, self.state, grad_divisor)
            elif group["foreach"]:  # lib/fused_optim.py: multi-tensor ops, one launch per line for all tensors
                fused_optim.adamw_foreach(group, params, self.state, grad_divisor)
            else:
                self._update(group, params, grad_divisor)
        return loss

    def _update(self, group: dict, params: list[Tensor], grad_divisor: Tensor | None) -> None:
        """The algorithm box, one parameter at a time, one line per line."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            g, state = p.grad, self.state[p]
            if grad_divisor is not None:
                g.div_(grad_divisor)  # g ← g / d: the clipping handed in (in place, as clip_grad_norm would)
            m, v, t = state["m"], state["v"], state["step"]
            m.mul_(beta1).add_(g, alpha=1 - beta1)  # m ← β1 m + (1 - β1) g: the first moment
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v ← β2 v + (1 - β2) g²: the second moment
            alpha_t = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)  # α_t ← α √(1-β2^t) / (1-β1^t): bias correction
            p.mul_(1 - lr * wd)  # θ ← θ - α λ θ: decoupled weight decay, on θ_{t-1}
            p.addcdiv_(m, v.sqrt().add_(eps), value=-alpha_t)  # θ ← θ - α_t m / (sqrt(v) + ε): the Adam step

    def load_state_dict(self, state_dict: dict) -> None:
        """Load moments, steps and hyperparameters; keep this optimizer's path (foreach / fused), whatever the
        checkpoint's was (checkpoints written before fused=True existed have no "fused" entry at all)."""
        paths = [(group["foreach"], group["fused"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (foreach, fused) in zip(self.param_groups, paths):
            group["foreach"], group["fused"] = foreach, fused


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

    One norm over ALL parameters (‖g‖ = sqrt(Σ_p Σ_i g_pi²)), not one per tensor, so clipping keeps the direction of
    the full gradient. The factor is max_norm / (‖g‖ + eps) when ‖g‖ > max_norm (eps guards against 0/0), else 1.
    note: the norm comes back as a 0-dim tensor on the gradients' device, not a float, and the factor is clamped
    rather than chosen by an `if`: reading a GPU number (`.item()`, `float()`, `if`) waits for the GPU, so a
    training loop does that only on the steps it logs. (train.py folds this into the fused AdamW step instead:
    lib/fused_optim.clip_divisor gives the same factor as a divisor, tested equal.)
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    sum_of_squares = sum((g.to(torch.promote_types(g.dtype, torch.float32)) ** 2).sum() for g in grads)  # Σ_p Σ_i g_pi²
    total_norm = torch.sqrt(sum_of_squares)  # ‖g‖, one number for all parameters
    factor = (max_norm / (total_norm + eps)).clamp(max=1.0)  # min(1, max_norm / (‖g‖ + eps))
    for g in grads:
        g.mul_(factor)  # in place: every gradient by the same factor
    return total_norm


# --------------------------------------------------------------------------------------------------------------------
# CLI: the handout's SGD learning-rate toy (§4.2)


def main(argv=None) -> None:
    parser = OneLineParser(prog="optim.py",
                           description="The handout's SGD learning-rate toy: minimise mean(θ²) at 3 lrs.")
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
