"""Benchmark: one training step (forward + backward + optimizer step) of model.TransformerLM + optim.AdamW against
Hugging Face transformers' LlamaForCausalLM + torch.optim.AdamW with the identical configuration, on CPU.

Both models are built from the same ModelConfig (SiLU-gated FFN with intermediate_size = d_ff, num_key_value_heads =
num_heads, untied embeddings, rope_theta 10000, rms_norm_eps 1e-5, SDPA attention; the parameter counts are checked
equal), fed the same random batch, and timed step by step, alternating ours / HF (then the same under
torch.autocast("cpu", dtype=torch.bfloat16)) in one process, so machine noise hits both alike. Reported: medians of
tokens/s, the ratio ours / HF, and MFU = accounting.train_flops_per_token x tokens/s / a measured torch.mm peak.
"Ours" is the speed layer, as train.py runs it: TransformerLM(fast=True), AdamW(fused=True), cross_entropy(fast=True).
--plain adds a third contestant, the chapters' readable code alone (fast=False everywhere: what `train.py --plain`
runs), alternated with the other two, and a table of what the speed layer buys. transformers is a benchmark-only
dependency (requirements-dev.txt).

    python bench/bench_model.py              # both configs, fp32 and bf16 autocast (~3 minutes on 2 idle cores)
    python bench/bench_model.py --quick      # smoke run: 2 timed steps each
    python bench/bench_model.py --configs ts17m --profile    # + torch.profiler op tables for one step of each
    python bench/bench_model.py --configs ts17m --plain      # + the readable path: fast vs plain step
"""
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: model.py, optim.py, accounting.py

from accounting import train_flops_per_token  # noqa: E402
from lib.measure import machine_line, measure_matmul_flops  # noqa: E402
from lib.cli import OneLineParser  # noqa: E402
from lib.cpu_tuning import tune_process, tuning_line  # noqa: E402
from model import PRESETS, TransformerLM  # noqa: E402
from optim import AdamW, cross_entropy  # noqa: E402

# The batch size of each preset (BENCHMARKS.md's tables): 16 x 256 and 8 x 256 tokens per step.
BATCH = {"tiny": 16, "ts17m": 8}


# --------------------------------------------------------------------------------------------------------------------
# The two contestants, built from one ModelConfig


def build_ours(cfg, fast: bool = True):
    """Our model and optimizer: the speed layer (lib/kernels.py, the fused AdamW step), or with fast=False the
    chapters' readable code (the per-parameter AdamW loop)."""
    model = TransformerLM(**dataclasses.asdict(cfg), fast=fast)  # attn_impl="sdpa": fused attention when fast
    return model, AdamW(model.parameters(), fused=fast)  # lr 1e-3, weight decay 0.01: torch's defaults too


def build_hf(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM  # benchmark-only dependency

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.context_length, rope_theta=cfg.rope_theta, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg)
    return model, torch.optim.AdamW(model.parameters())  # defaults: lr 1e-3, weight decay 0.01, CPU: per-tensor loop


def make_step(model, opt, x, y, is_hf: bool, bf16: bool, fast: bool = True):
    """A closure running one training step; both sides compute the loss the same way (fp32 logsumexp); fast: our
    loss's speed layer (lib/fused_optim.py's chunked fused softmax) or the readable formula."""

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits if is_hf else model(x)  # (B, T, V)
        if is_hf:
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # torch's fused log_softmax + nll
        else:
            loss = cross_entropy(logits, y, fast=fast)  # ours: logsumexp - target logit
        loss.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------------------------------
# The MFU denominator: a measured torch.mm peak

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_SIZES = (1024, 2048)  # n of the n x n matmuls; a CPU's rate differs between them (cache blocking, threads)
PEAK_REPEATS = 3


def matmul_peak(dtype, seconds: float) -> float:
    """FLOP/s: the median over PEAK_SIZES x PEAK_REPEATS of lib.measure.measure_matmul_flops (each the best timing
    of ~`seconds`). note: the median, so that one lucky size or one quiet moment on a shared machine does not set
    the denominator alone."""
    return statistics.median(measure_matmul_flops("cpu", dtype, n=n, seconds=seconds)
                             for n in PEAK_SIZES for _ in range(PEAK_REPEATS))


# --------------------------------------------------------------------------------------------------------------------
# Timing: alternate the contestants, take medians


def bench_config(name: str, rounds: int, warmup: int, precisions: list[str], profile: bool,
                 plain: bool = False) -> list[dict]:
    cfg = PRESETS[name]
    B, T = BATCH[name], cfg.context_length
    torch.manual_seed(0)
    ours, ours_opt = build_ours(cfg)
    hf, hf_opt = build_hf(cfg)
    contestants = [("ours", ours, ours_opt), ("hf", hf, hf_opt)]
    if plain:  # the chapters' readable code, from the same initial weights as ours
        torch.manual_seed(0)
        contestants.append(("plain", *build_ours(cfg, fast=False)))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise SystemExit(f"{name}: parameter counts differ (ours {n_ours:,}, HF {n_hf:,}): configs do not match")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

    # One entry per (precision, contestant); the order inside a round flips every round so neither always goes first.
    steps = {(p, who): make_step(model, opt, x, y, who == "hf", p == "bf16", fast=who != "plain")
             for p in precisions for who, model, opt in contestants}
    times = {key: [] for key in steps}
    for key, step in steps.items():
        for _ in range(warmup):
            step()
    for r in range(rounds):
        for key in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            t0 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t0)

    if profile:
        from torch.profiler import profile as torch_profile

        for key, step in steps.items():
            with torch_profile() as prof:
                step()
            print(f"\n### profile: {name} {key[0]} {key[1]}\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    flops_per_token = train_flops_per_token(cfg, T)
    rows = []
    for p in precisions:
        tok_s = {who: B * T / statistics.median(times[(p, who)]) for who, *_ in contestants}
        # The ratio of each round's adjacent pair of steps, then the median: robust to load that drifts over a run.
        paired = {who: statistics.median(h / o for o, h in zip(times[(p, "ours")], times[(p, who)]))
                  for who, *_ in contestants}
        rows.append(dict(config=name, batch=B, seq=T, precision=p, **tok_s, paired=paired["hf"],
                         paired_plain=paired.get("plain"), flops_per_token=flops_per_token, n_params=n_ours))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    parser = OneLineParser(description="Training-step throughput: TransformerLM vs HF LlamaForCausalLM.")
    parser.add_argument("--configs", nargs="+", choices=sorted(BATCH), default=["tiny", "ts17m"])
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per contestant and precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant and precision first")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast rows")
    parser.add_argument("--quick", action="store_true", help="smoke run: --rounds 2 --warmup 1, short peak timing")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for one step of each")
    parser.add_argument("--plain", action="store_true",
                        help="also time the chapters' readable code (fast=False everywhere): what the speed layer buys")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 2, 1
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    try:
        import transformers  # noqa: F401
    except ImportError:
        parser.error("this benchmark needs Hugging Face transformers: pip install -r requirements-dev.txt")

    precisions = ["fp32"] if args.no_bf16 else ["fp32", "bf16"]
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: 1-minute load average is {load_before:.2f}: other processes are busy, timings are noisy",
              file=sys.stderr)
    seconds = 0.1 if args.quick else 0.5
    peak = {p: matmul_peak(DTYPES[p], seconds) for p in precisions}
    rows = []
    for name in args.configs:
        rows += bench_config(name, args.rounds, args.warmup, precisions, args.profile, args.plain)
        print(f"done: {name}", file=sys.stderr)
    load_after = os.getloadavg()[0]

    command = "python bench/bench_model.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    print("\n## model.py\n")
    print("One training step (forward + backward + optimizer step, loss included) on CPU: model.TransformerLM +")
    print("optim.AdamW(fused=True) vs Hugging Face `LlamaForCausalLM` (same config, SDPA attention) +")
    print(f"torch.optim.AdamW, alternated step by step in one process; medians of {args.rounds} steps each.")
    print("'paired' = the median over rounds of the ratio of adjacent steps (robust to drifting load).")
    print("MFU = accounting.train_flops_per_token x tokens/s / the measured torch.mm peak of that precision.\n")
    print(f"Command: `{command.strip()}`  ")
    print(f"Machine: {machine_line()}; {tuning_line()}; load average {load_before:.2f} before, "
          f"{load_after:.2f} after  ")
    sizes = ", ".join(map(str, PEAK_SIZES))
    print(f"torch.mm peak (median of n = {sizes}, {PEAK_REPEATS} each): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s"
          + (f", bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in peak else "") + "\n")
    print("| config | batch x context | precision | ours tokens/s | HF tokens/s | ours / HF | ours / HF, paired "
          "| ours MFU | HF MFU |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = {who: r[who] * r["flops_per_token"] / peak[r["precision"]] for who in ("ours", "hf")}
        precision = "fp32" if r["precision"] == "fp32" else "bf16 autocast"
        print(f"| {r['config']} ({r['n_params'] / 1e6:.1f}M) | {r['batch']} x {r['seq']} | {precision} "
              f"| {r['ours']:,.0f} | {r['hf']:,.0f} | {r['ours'] / r['hf']:.2f}x | {r['paired']:.2f}x "
              f"| {100 * mfu['ours']:.0f}% | {100 * mfu['hf']:.0f}% |")
    if "bf16" in precisions:
        print()
        for name in args.configs:
            fp32, bf16 = (next(r for r in rows if (r["config"], r["precision"]) == (name, p)) for p in ("fp32", "bf16"))
            print(f"- {name}: bf16 autocast / fp32 = {bf16['ours'] / fp32['ours']:.2f}x (ours), "
                  f"{bf16['hf'] / fp32['hf']:.2f}x (HF)")
    print("\nTargets: ours / HF >= 1.0x at both configs in fp32; bf16 autocast >= 2x our fp32 tokens/s.")
    if args.plain:
        print_plain_table(rows)


def print_plain_table(rows: list[dict]) -> None:
    """--plain: the speed layer (ours) against the chapters' readable code (plain), same steps, same process."""
    print("\nWhat the speed layer buys: ours (TransformerLM(fast=True), AdamW(fused=True), cross_entropy(fast=True))")
    print("vs the chapters' readable code (fast=False everywhere, as `train.py --plain`), alternated step by step.\n")
    print("| config | batch x context | precision | plain tokens/s | ours tokens/s | ours / plain | ours / plain, "
          "paired |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        precision = "fp32" if r["precision"] == "fp32" else "bf16 autocast"
        print(f"| {r['config']} | {r['batch']} x {r['seq']} | {precision} | {r['plain']:,.0f} | {r['ours']:,.0f} "
              f"| {r['ours'] / r['plain']:.2f}x | {r['paired_plain']:.2f}x |")


if __name__ == "__main__":
    tune_process()  # first: time the step under the settings `python train.py` runs with
    main()
