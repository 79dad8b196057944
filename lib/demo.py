"""lib/demo.py: the offline demo (`python train.py`, `train.py demo [--quick]`) and `train.py plot`.

system (pydoc_data.topics, about 465K characters of English about Python). Each hop is one named function:
bpe.train_bpe -> Tokenizer.save_dir -> datasets.encode_file -> train() -> sample.load_model -> sample.generate.
The demo takes the fast paths as every program does; `train.py demo --plain` runs the chapters' readable code only
(the readable BPE trainer and encoder, and a --plain training run).

    python train.py                                        # the demo: BPE, encode, train, sample
    python train.py demo --quick                           # seconds, for CI
    python train.py plot runs/a runs/b -o curves.png       # loss vs step and vs wall time
"""
import sys
import time
from pathlib import Path

import torch

import bpe
import sample
import train
from lib import cli, datasets
from lib.cli import BadInputError, OneLineParser, atomic_file, atomic_write_text
from lib.runs import line_numbers, parse_log


DEMO = {  # full: about a minute on 2 CPU cores; quick: seconds, for CI
    "full": dict(vocab_size=1024, docs=None, flags=["--context-length", "128", "--d-model", "128", "--num-layers",
                 "4", "--num-heads", "4", "--d-ff", "344", "--batch-size", "16", "--max-iters", "300", "--lr",
                 "3e-3", "--min-lr", "3e-4", "--warmup-iters", "20", "--eval-interval", "100", "--eval-iters", "8",
                 "--log-interval", "20"], new_tokens=120),
    "quick": dict(vocab_size=300, docs=12, flags=["--context-length", "32", "--d-model", "32", "--num-layers", "2",
                  "--num-heads", "2", "--d-ff", "96", "--batch-size", "8", "--max-iters", "20", "--lr", "3e-3",
                  "--min-lr", "3e-4", "--warmup-iters", "2", "--eval-interval", "10", "--eval-iters", "2",
                  "--log-interval", "5", "--peak-flops", "0"], new_tokens=30),
}


def demo(out: Path, quick: bool = False, plain: bool = False) -> None:
    from pydoc_data.topics import topics  # imported here: only the demo needs it
    setting = DEMO["quick" if quick else "full"]
    t_start = time.time()
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    data_dir.mkdir(parents=True, exist_ok=True)

    # 1. corpus: one document per help topic, in a fixed order; the last tenth is the validation split.
    docs = [topics[k].strip() for k in sorted(topics)][:setting["docs"]]
    n_valid = max(1, len(docs) // 10)
    for name, split in (("train.txt", docs[:-n_valid]), ("valid.txt", docs[-n_valid:])):
        atomic_write_text(data_dir / name, "".join(doc + bpe.END_OF_TEXT for doc in split))
    print(f"[1/5] corpus: {len(docs)} pydoc topics, {sum(map(len, docs)):,} characters -> {data_dir}/train.txt, "
          f"valid.txt")

    # 2. a byte-level BPE tokenizer trained on the training split, saved as a tokenizer directory.
    t = time.time()
    vocab, merges = bpe.train_bpe(data_dir / "train.txt", setting["vocab_size"], special_tokens=[bpe.END_OF_TEXT],
                                  fast=not plain)
    tokenizer = bpe.Tokenizer(vocab, merges, special_tokens=[bpe.END_OF_TEXT], fast=not plain)
    tokenizer.save_dir(data_dir)  # vocab.json, merges.txt, special_tokens.json
    print(f"[2/5] BPE: {len(vocab)} tokens, {len(merges)} merges in {time.time() - t:.1f}s -> {data_dir}/vocab.json")

    # 3. both splits encoded to uint16 .npy: data_dir is now what `bpe.py prepare` makes.
    t = time.time()
    n = {split: datasets.encode_file(tokenizer, data_dir / f"{split}.txt", data_dir / f"{split}.npy")
         for split in ("train", "valid")}
    print(f"[3/5] encoded {n['train']:,} training and {n['valid']:,} validation tokens in {time.time() - t:.1f}s "
          f"-> {data_dir}/train.npy, valid.npy")

    # 4. train a small model: exactly what this command line does.
    argv = ["--data", str(data_dir), "--out", str(run_dir), "--overwrite", "--device", "cpu", *setting["flags"],
            *(["--plain"] if plain else [])]
    print(f"[4/5] training: python train.py {' '.join(argv)}")
    t = time.time()
    train.train_main(argv)
    print(f"      trained in {time.time() - t:.1f}s")

    # 5. sample from the checkpoint, rebuilding model and tokenizer from it alone (as sample.py does).
    model, tok, _ = sample.load_model(run_dir / "last.pt", "cpu", fast=not plain)
    prompt = "The "
    ids = sample.generate(model, tok.encode(prompt), setting["new_tokens"], temperature=0.8, top_p=0.95,
                          eos_id=tok.special_token_ids[bpe.END_OF_TEXT], generator=torch.Generator().manual_seed(0))
    print(f"[5/5] sample (temperature 0.8, top-p 0.95):\n\n{prompt}{tok.decode(ids.tolist())}\n")
    print(f"demo done in {time.time() - t_start:.0f}s. Files: corpus, tokenizer and token ids in {data_dir}/; "
          f"log.jsonl, last.pt, best.pt in {run_dir}/\n"
          f"next:\n"
          f"  python sample.py {run_dir}/last.pt              # more samples from this model\n"
          f"  python train.py plot {run_dir} -o curves.png    # its loss curves\n"
          f"  python bpe.py prepare tinystories --out data/tinystories    # the handout's dataset (downloads)\n"
          f"  python train.py --data data/tinystories --preset ts17m --device cuda --out runs/ts17m   # on a GPU")


def demo_main(argv) -> None:
    p = OneLineParser(prog="train.py demo",
                          description="offline end-to-end demo (also what `python train.py` runs)")
    p.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a seconds-long version for CI")
    p.add_argument("--plain", action="store_true", help="the chapters' readable code only (BPE, encoder, training)")
    a = p.parse_args(argv)
    demo(Path(a.out), quick=a.quick, plain=a.plain)


# ---------------------------------------------------------------------------------------------------------------
# Plots: python train.py plot RUN_DIR... -o curves.png
# ---------------------------------------------------------------------------------------------------------------


def plot(run_dirs, out_png) -> None:
    """Train (solid) and validation (dashed) loss against optimizer step and wall-clock time, one colour per run."""
    cli.optional_import("matplotlib", "matplotlib", "plotting").use("Agg")  # files only: no display needed
    plt = cli.optional_import("matplotlib.pyplot", "matplotlib", "plotting")
    image_format = check_image_path(Path(out_png))  # before any work
    logs = [run_log(Path(run)) for run in run_dirs]
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, rows in zip(run_dirs, logs):
        name = Path(run).name
        for ax, x_key in ((by_step, "step"), (by_time, "time")):
            train = [(r[x_key], r["loss"]) for r in rows if "loss" in r and x_key in r]
            val = [(r[x_key], r["val_loss"]) for r in rows if "val_loss" in r and x_key in r]
            (line,) = ax.plot(*zip(*train), label=f"{name} train") if train else ax.plot([], [])
            if val:
                ax.plot(*zip(*val), "--o", markersize=3, color=line.get_color(), label=f"{name} val")
    for ax, label in ((by_step, "optimizer step"), (by_time, "wall-clock time (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(out_png) as f:  # all or nothing, like every file the project writes
        fig.savefig(f, dpi=120, format=image_format)
    print(f"wrote {out_png}")


def check_image_path(out: Path) -> str:
    """The image format -o names (its suffix; none: png), refused if matplotlib cannot write it or the file cannot
    be made there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    supported = FigureCanvasAgg.get_supported_filetypes()
    image_format = out.suffix.lstrip(".").lower() or "png"
    if image_format not in supported:
        raise BadInputError(f"-o {out}: unknown image format '.{image_format}'; name the file with one of "
                            f"{', '.join('.' + name for name in sorted(supported))}")
    if out.is_dir():
        raise BadInputError(f"-o {out} is a directory: name the image file, e.g. -o {out / 'curves.png'}")
    if not out.parent.is_dir():
        raise BadInputError(f"-o {out}: directory {out.parent} does not exist; make it or pick another -o")
    return image_format


def run_log(run: Path) -> list[dict]:
    """A run's readable log rows; the unreadable ones are skipped, and how many is said in one line."""
    path = run / "log.jsonl"
    rows, damaged = parse_log(path)
    if not rows and damaged:
        raise BadInputError(f"{path} has no readable rows to plot ({line_numbers(damaged)} damaged)")
    if not rows:
        raise BadInputError(f"{run} has no log.jsonl rows to plot (is it a train.py run directory?)")
    if damaged:
        print(f"train.py: warning: {path}: skipped {len(damaged)} unreadable row{'s' * (len(damaged) > 1)} "
              f"({line_numbers(damaged)})", file=sys.stderr)
    return rows


def plot_main(argv) -> None:
    p = OneLineParser(prog="train.py plot", description="loss curves of one or more run directories")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", default="curves.png", help="output image (default curves.png)")
    a = p.parse_args(argv)
    plot(a.runs, a.out)
