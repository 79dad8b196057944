"""accounting.py's bad-input table (issue 32): each row a command line, the exit code and the whole one-line error,
word for word (conftest.py's BadInput harness). accounting.py writes no files, so no row has paths to check."""
import pytest

import accounting
from conftest import BadInput, check_bad_input, run_cli

E = "accounting.py: error: "
HELP = " (see --help)"  # OneLineParser's ending of every line
GPUS = "v100, a100, h100, h100-pcie, h200"
PRESETS = "gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, gpt2-xl-16k, tiny, ts17m"

ROWS = [
    # an unknown GPU is named, even before --steps and --mfu are missing (it said they were missing, not the GPU)
    BadInput("unknown-gpu-alone", ["--gpu", "unknown"], 2, E + f"unknown GPU 'unknown'; choose one of {GPUS}" + HELP),
    BadInput("unknown-gpu", ["--gpu", "tpu", "--steps", "10", "--mfu", "0.5"], 2,
             E + f"unknown GPU 'tpu'; choose one of {GPUS}" + HELP),
    BadInput("gpu-without-the-dtype", ["--gpu", "v100", "--dtype", "bf16", "--steps", "10", "--mfu", "0.5"], 2,
             E + "no published bf16 peak for v100; it has fp32, fp16" + HELP),
    BadInput("unknown-preset", ["--preset", "gpt3"], 2, E + f"unknown preset 'gpt3'; choose one of {PRESETS}" + HELP),
    # the time estimate: the flags that are missing are named
    BadInput("steps-without-gpu", ["--steps", "10"], 2,
             E + "the time estimate needs --steps, --gpu and --mfu together; add --gpu and --mfu "
                 "(e.g. --steps 400000 --gpu a100 --mfu 0.5)" + HELP),
    BadInput("gpu-without-mfu", ["--steps", "10", "--gpu", "a100"], 2,
             E + "the time estimate needs --steps, --gpu and --mfu together; add --mfu "
                 "(e.g. --steps 400000 --gpu a100 --mfu 0.5)" + HELP),
    BadInput("mfu-over-1", ["--mfu", "2"], 2, E + "--mfu must be in (0, 1], got 2.0" + HELP),
    BadInput("mfu-nan", ["--mfu", "nan", "--steps", "1", "--gpu", "a100"], 2, E + "--mfu must be in (0, 1], got nan" + HELP),
    BadInput("mfu-not-a-number", ["--mfu", "half"], 2, E + "argument --mfu: invalid float value: 'half'" + HELP),
    # sizes: zero, negative, not an integer
    BadInput("batch-size-0", ["--preset", "gpt2-xl", "--batch-size", "0"], 2,
             E + "argument --batch-size: must be a positive integer, got '0'" + HELP),
    BadInput("seq-len-negative", ["--seq-len", "-1"], 2, E + "argument --seq-len: must be a positive integer, got '-1'" + HELP),
    BadInput("vocab-size-float", ["--vocab-size", "1e5"], 2,
             E + "argument --vocab-size: must be a positive integer, got '1e5'" + HELP),
    BadInput("fsdp-0", ["--fsdp", "0"], 2, E + "argument --fsdp: must be a positive integer, got '0'" + HELP),
    BadInput("gpu-mem-negative", ["--gpu-mem", "-5"], 2,
             E + "argument --gpu-mem: bad memory size '-5'; write e.g. 80GB or 80GiB" + HELP),
    BadInput("gpu-mem-unit", ["--gpu-mem", "80XB"], 2,
             E + "argument --gpu-mem: bad memory size '80XB'; write e.g. 80GB or 80GiB" + HELP),
    BadInput("seq-len-over-context", ["--preset", "tiny", "--seq-len", "100000"], 2,
             E + "--seq-len 100000 exceeds context_length 256" + HELP),
    BadInput("heads-do-not-divide", ["--num-heads", "7"], 2, E + "d_model (1600) must be divisible by num_heads (7)" + HELP),
    BadInput("rope-theta-negative", ["--rope-theta", "-1"], 2, E + "rope_theta must be positive, got -1.0" + HELP),
    BadInput("unknown-flag", ["--preset", "tiny", "--layers", "2"], 2, E + "unrecognized arguments: --layers 2" + HELP),
    # a mode given flags it does not read (each was ignored silently)
    BadInput("compare-with-model-flag", ["--compare", "--d-model", "64"], 2,
             E + "--compare prints every preset at its own size and context length and does not use --d-model; "
                 "drop it" + HELP),
    BadInput("compare-with-time-estimate", ["--compare", "--gpu-mem", "80GB", "--steps", "10", "--gpu", "a100",
                                            "--mfu", "0.5"], 2,
             E + "--compare prints every preset at its own size and context length and does not use --gpu-mem, "
                 "--steps, --gpu, --mfu; drop them" + HELP),
    BadInput("measure-with-json", ["--preset", "tiny", "--measure", "--json"], 2,
             E + "--measure prints the activations of one CPU run of the model and does not use --json; drop it" + HELP),
    BadInput("measure-with-compare", ["--preset", "tiny", "--measure", "--compare"], 2,
             E + "--measure prints the activations of one CPU run of the model and does not use --compare; drop it"
             + HELP),
    BadInput("fsdp-table-with-preset", ["--fsdp-table", "--preset", "tiny"], 2,
             E + "--fsdp-table prints its own Markdown table (the GPT-2 family, with and without checkpointing) and "
                 "does not use --preset; drop it" + HELP),
    BadInput("fsdp-table-with-json", ["--fsdp-table", "--json"], 2,
             E + "--fsdp-table prints its own Markdown table (the GPT-2 family, with and without checkpointing) and "
                 "does not use --json; drop it" + HELP),
    BadInput("measure-too-big", ["--preset", "gpt2-xl", "--measure"], 2,
             E + "--measure runs the model on CPU and would need ~40.57 GB; pick a small config (e.g. --preset tiny)"
             + HELP),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row, tmp_path, capsys):
    check_bad_input(row, accounting.main, tmp_path, capsys)


def test_gpu_names_are_case_insensitive(capsys):
    """--gpu A100 is the a100 of the table (it was refused as an unknown GPU)."""
    code, out, err = run_cli(accounting.main, ["--preset", "tiny", "--steps", "10", "--gpu", "A100", "--mfu", "0.5"],
                             capsys)
    assert code == 0 and err == "" and "Time: 10 steps" in out and "one a100" in out
