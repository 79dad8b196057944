"""Benchmark: one training step of two versions of model.py (and optim.py), alternated step by step in one process
(an A/B test).

On a noisy machine two separate runs of a benchmark can differ by 5-10% while the change being measured is 1%: the
machine's speed drifts from minute to minute. Alternating the two versions step by step in one process puts both
under the same drift, so their paired ratio (the median over rounds of new / old for adjacent steps) resolves
changes well below the noise of separate runs. Run it with the same file twice (an A/A test) to see the noise floor.

    git show HEAD:model.py > /tmp/model_old.py
    python bench/ab_model.py /tmp/model_old.py model.py                 # bench_small.py's size, 300 rounds
    python bench/ab_model.py /tmp/model_old.py model.py --preset ts17m --steps 20 [--bf16]
    git show a86aed4:optim.py > /tmp/optim_old.py      # the whole step: each side with its own optim.py too
    python bench/ab_model.py /tmp/model_old.py model.py --optim /tmp/optim_old.py optim.py --preset ts17m --steps 20

The step is bench/bench_small.py's our_step, train.train_step's work on a fixed batch: forward, optim.cross_entropy,
backward, the clip divisor, optim.AdamW(fused=True).step(grad_divisor), zero_grad; optim.py is this tree's for both
sides unless --optim names two versions. Each version runs its fast path: TransformerLM(..., fast=True) and
cross_entropy(..., fast=True) where the version takes the switch (issue 31's layout), its default where it predates
it (the speed layer was the default then); clip_divisor from the optim.py that has it, else lib/fused_optim.py.
Both models start from the same seed; lib/ and the rest of the repository are shared. A version from before lib/
(its `from cli import ...`) loads too: `cli` is pointed at lib/cli.py, where that file moved.
"""
import dataclasses
import importlib.util
import inspect
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo root (optim.py, cli.py, ...) and bench/ (bench_small.py)

from lib.measure import machine_line  # noqa: E402
from bench_model import BATCH as PRESET_BATCH  # noqa: E402
from bench_small import BATCH, GRAD_CLIP, HYPER, OUR_D_FF, SIZE, alternated_times  # noqa: E402
from lib import cli, fused_optim  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402


def load_module(path: str, name: str):
    """Import a file (a model.py, a bpe.py) from any path under its own module name, so two versions live side by
    side. note: a version from before lib/ imports `cli`; it gets lib.cli, the same file moved."""
    sys.modules.setdefault("cli", cli)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # note: dataclasses look their module up in sys.modules while the file runs
    spec.loader.exec_module(module)
    return module


def fast_switch(fn) -> dict:
    """{"fast": True} for a function or class that takes the switch; {} for a version that predates it."""
    return {"fast": True} if "fast" in inspect.signature(fn).parameters else {}


def versioned_step(x, y, bf16: bool, lm, optim):
    """bench_small.our_step's work with one optim.py version (its AdamW, loss and clip divisor, on their fast path)."""
    opt = optim.AdamW(lm.parameters(), **HYPER, fused=True)  # as train.py builds it
    clip_divisor = getattr(optim, "clip_divisor", fused_optim.clip_divisor)  # in optim.py before lib/ existed
    loss_switch = fast_switch(optim.cross_entropy)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = optim.cross_entropy(lm(x), y, **loss_switch)
        loss.backward()
        _, divisor = clip_divisor(lm.parameters(), GRAD_CLIP)  # clipping inside the fused update, as train.py
        opt.step(grad_divisor=divisor)
        opt.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    parser = OneLineParser(description="Training step of two model.py versions, alternated (A/B).")
    parser.add_argument("old", help="path of the baseline model.py")
    parser.add_argument("new", help="path of the changed model.py")
    parser.add_argument("--preset", choices=["small", "ts17m"], default="small",
                        help="small: bench_small.py's size and batch; ts17m: model.PRESETS['ts17m'], batch 8 x 256")
    parser.add_argument("--steps", type=int, default=300, help="timed rounds (one step of each per round)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each first")
    parser.add_argument("--bf16", action="store_true", help="the step under bf16 autocast, as train.py --dtype bf16")
    parser.add_argument("--optim", nargs=2, metavar=("OLD", "NEW"),
                        help="paths of two optim.py versions, one for each side (default: this tree's for both)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    for path in (args.old, args.new, *(args.optim or [])):
        if not Path(path).is_file():
            parser.error(f"{path} is not a file; pass the paths of two model.py (and optim.py) versions")

    modules = {"old": load_module(args.old, "model_old"), "new": load_module(args.new, "model_new")}
    if args.optim:
        optims = {"old": load_module(args.optim[0], "optim_old"), "new": load_module(args.optim[1], "optim_new")}
    else:
        import optim
        optims = {"old": optim, "new": optim}
    if args.preset == "small":
        size, (B, T) = {**SIZE, "d_ff": OUR_D_FF}, (BATCH, SIZE["context_length"])
    else:
        size = dataclasses.asdict(modules["new"].PRESETS["ts17m"])  # TransformerLM takes every ModelConfig field
        B, T = PRESET_BATCH["ts17m"], size["context_length"]  # bench_model.py's batch for it
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, size["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, size["vocab_size"], (B, T), generator=g)
    steps = {}
    for who, module in modules.items():
        torch.manual_seed(0)  # both models start from the same weights
        lm = module.TransformerLM(**size, **fast_switch(module.TransformerLM))
        steps[who] = versioned_step(x, y, args.bf16, lm, optims[who])
    times = alternated_times(steps, args.steps, args.warmup)

    paired = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
    print(f"Command: `python bench/ab_model.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ")
    print(f"Machine: {machine_line()}; {tuning_line()}; {args.preset}, batch {B} x {T}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.steps} rounds  ")
    print(" | ".join(f"{who} median {1e3 * statistics.median(t):.2f} ms" for who, t in times.items()))
    print(f"new / old step time: {paired:.4f} paired")


if __name__ == "__main__":
    tune_process()  # first: time the step under the settings `python train.py` runs with
    main()
