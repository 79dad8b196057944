"""Benchmark: a small model's full training step, ours vs a plain PyTorch GPT of the same size (bench/plain_gpt.py).

At d_model 128, 4 layers, 4 heads, context 64, batch 12, vocab 256 the matmuls are tiny, so the step time is mostly
per-op overhead: kernel launches per block, Python work per parameter, allocations. This measures what our
from-scratch code costs there beyond what a PyTorch user would write.

Both sides do the same work per step, the work of train.train_step on one fixed batch (no data loading, no logging):
    ours:   model.TransformerLM(fast=True) (SwiGLU d_ff 344, RMSNorm, RoPE, SDPA) + optim.cross_entropy(fast=True)
            + backward + lib.fused_optim.clip_divisor + optim.AdamW(fused=True, as train.py builds it)
            .step(grad_divisor) + zero_grad
    plain:  plain_gpt.PlainGPT (GELU MLP 4x, nn.LayerNorm, learned positions, SDPA) + F.cross_entropy + backward
            + torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW (its defaults: the per-tensor loop on CPU) + zero_grad
with train.py's defaults: lr 1e-3, betas (0.9, 0.95), weight decay 0.1, clipping at 1.0. The two models have the same
shapes up to the FFN (3 x 128 x 344 vs 2 x 128 x 512 weights: 0.8% more in ours) and the position embedding table
(plain only); the reported FLOP ratio says how far apart their matmul work is. The steps alternate one by one in this
process; reported are medians and the paired ratio (the median over rounds of ours / plain for adjacent steps).

    python bench/bench_small.py                      # fp32, 300 alternated steps each (~30 s)
    python bench/bench_small.py --bf16 --steps 100   # under torch.autocast("cpu", dtype=torch.bfloat16)
    python bench/bench_small.py --profile            # + torch.profiler tables of 20 steps of each
    python bench/bench_small.py --without rmsnorm    # what a piece of ours costs (see our_model): rmsnorm | rope
    python bench/bench_small.py --overhead           # at a size where the kernels do nothing: per-op costs only
"""
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo root (model.py, optim.py, ...) and bench/ (plain_gpt.py)

from lib.measure import machine_line  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402
from lib.runs import DEFAULTS  # noqa: E402
from model import RMSNorm, TransformerLM  # noqa: E402
from lib.fused_optim import clip_divisor  # noqa: E402
from optim import AdamW, cross_entropy  # noqa: E402
from plain_gpt import PlainGPT  # noqa: E402

SIZE = dict(vocab_size=256, context_length=64, d_model=128, num_layers=4, num_heads=4)
OUR_D_FF = 344  # ≈ 8/3 x 128, rounded up to a multiple of 8: SwiGLU's three matrices ≈ the GELU MLP's two at 4x
BATCH = 12
# --overhead: the same layers at a size where every kernel does almost nothing (1 x 4 tokens, d_model 16), so the step
# time is the fixed cost of its ops: Python, dispatch, autograd nodes. What the two models' op counts cost, apart.
OVERHEAD_SIZE = dict(vocab_size=16, context_length=4, d_model=16, num_layers=4, num_heads=4)
OVERHEAD_D_FF, OVERHEAD_BATCH = 48, 1
HYPER = dict(lr=DEFAULTS["lr"], betas=(DEFAULTS["beta1"], DEFAULTS["beta2"]), weight_decay=DEFAULTS["weight_decay"])
GRAD_CLIP = DEFAULTS["grad_clip"]


def our_model(without: str | None = None, size: dict = SIZE, d_ff: int = OUR_D_FF) -> TransformerLM:
    """Our TransformerLM at `size` (SIZE); without="rope": no position information (position="nope"); without="rmsnorm":
    each RMSNorm computed by torch's native F.layer_norm (gain, no bias) instead. Both are other models, only for
    measuring what one of our pieces costs against the plain model, which has neither RoPE nor RMSNorm."""
    lm = TransformerLM(**size, d_ff=d_ff, position="nope" if without == "rope" else "rope", fast=True)
    if without == "rmsnorm":
        for norm in (m for m in lm.modules() if isinstance(m, RMSNorm)):
            norm.forward = lambda x, norm=norm: F.layer_norm(x, x.shape[-1:], norm.weight, None, norm.eps)
    return lm


def our_step(x, y, bf16: bool, model=None):
    """train.train_step's work with our code, on a fixed batch; model: a TransformerLM, by default one of SIZE."""
    model = our_model() if model is None else model
    opt = AdamW(model.parameters(), **HYPER, fused=True)  # as train.build_trainer builds it

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = cross_entropy(model(x), y, fast=True)
        loss.backward()
        _, divisor = clip_divisor(model.parameters(), GRAD_CLIP)  # clipping inside the fused update, as train.py
        opt.step(grad_divisor=divisor)
        opt.zero_grad(set_to_none=True)

    return model, step


def plain_step(x, y, bf16: bool, size: dict = SIZE):
    """The same work as a plain PyTorch user writes it, a PlainGPT at `size` (SIZE)."""
    model = PlainGPT(**size)
    opt = torch.optim.AdamW(model.parameters(), **HYPER)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def matmul_flops(model, tokens: int) -> int:
    """2 x tokens (B·T) x weight elements of every 2-D weight that multiplies (embedding lookups excluded), forward
    only."""
    return sum(2 * tokens * p.numel() for name, p in model.named_parameters()
               if p.dim() == 2 and "embeddings" not in name)


def alternated_times(steps: dict, rounds: int, warmup: int) -> dict:
    """{name: [seconds of each timed call]} for two step functions {name: fn}: `warmup` untimed calls of each, then
    `rounds` rounds of one call of each, their order swapped every round so that neither always goes first."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    first, second = steps
    times = {who: [] for who in steps}
    for r in range(rounds):
        for who in ((first, second) if r % 2 == 0 else (second, first)):
            t0 = time.perf_counter()
            steps[who]()
            times[who].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    parser = OneLineParser(description="Small-model training step: ours vs a plain PyTorch GPT of the same size.")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per side first")
    parser.add_argument("--bf16", action="store_true", help="both under torch.autocast(cpu, bfloat16)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of 20 steps of each")
    parser.add_argument("--overhead", action="store_true",
                        help=f"both models at {OVERHEAD_SIZE}, batch {OVERHEAD_BATCH}: the ops' fixed costs only")
    parser.add_argument("--without", choices=["rmsnorm", "rope"],
                        help="ours with that piece swapped out (see our_model): what it costs, not a target")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size, d_ff, batch = (OVERHEAD_SIZE, OVERHEAD_D_FF, OVERHEAD_BATCH) if args.overhead else (SIZE, OUR_D_FF, BATCH)
    x = torch.randint(0, size["vocab_size"], (batch, size["context_length"]), generator=g)
    y = torch.randint(0, size["vocab_size"], (batch, size["context_length"]), generator=g)
    ours, ours_step = our_step(x, y, args.bf16, our_model(args.without, size, d_ff))
    plain, plain_step_ = plain_step(x, y, args.bf16, size)
    steps = {"ours": ours_step, "plain": plain_step_}
    load_before = os.getloadavg()[0]
    times = alternated_times(steps, args.steps, args.warmup)
    load_after = os.getloadavg()[0]

    command = "python bench/bench_small.py" + "".join(" " + a for a in (argv if argv is not None else sys.argv[1:]))
    n = {who: sum(p.numel() for p in m.parameters()) for who, m in (("ours", ours), ("plain", plain))}
    print("\n## Small-model training step: ours vs plain PyTorch\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {machine_line()}; {tuning_line()}; load average {load_before:.2f} before, "
          f"{load_after:.2f} after  ")
    swapped = {"rmsnorm": "; ours WITHOUT RMSNorm (F.layer_norm instead)", "rope": "; ours WITHOUT RoPE"}
    print(f"Model: {size}, batch {batch}, ours d_ff {d_ff}, {'bf16 autocast' if args.bf16 else 'fp32'}"
          f"{swapped.get(args.without, '')}; parameters ours "
          f"{n['ours']:,}, plain {n['plain']:,}; matmul FLOPs ours / plain = "
          f"{matmul_flops(ours, x.numel()) / matmul_flops(plain, x.numel()):.3f}\n")
    print("| step | median ms | min ms |")
    print("|---|---:|---:|")
    for who in steps:
        print(f"| {who} | {1e3 * statistics.median(times[who]):.2f} | {1e3 * min(times[who]):.2f} |")
    paired = statistics.median(o / p for o, p in zip(times["ours"], times["plain"]))
    print(f"\nours / plain step time: {statistics.median(times['ours']) / statistics.median(times['plain']):.3f}x "
          f"by medians, {paired:.3f}x paired" + ("" if args.overhead or args.without else " (target <= 1.0x)"))

    if args.profile:
        from torch.profiler import profile

        for who, step in steps.items():
            with profile() as prof:
                for _ in range(20):
                    step()
            events = prof.key_averages()
            aten_ops = sum(e.count for e in events if e.key.startswith("aten::")) / 20
            nodes = sum(e.count for e in events if e.key.startswith("autograd::engine::evaluate_function")) / 20
            print(f"\n### profile: {who}, 20 steps: {aten_ops:.0f} aten ops and {nodes:.0f} autograd nodes per step\n")
            print(events.table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    tune_process()  # first: time the step under the settings `python train.py` runs with
    main()
