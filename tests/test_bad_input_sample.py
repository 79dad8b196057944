"""sample.py's bad-input table (issue 32): flags, checkpoints, tokenizers and --eval files it must refuse with one
line (exit 2: the input's fault; exit 1: not), and plain tests of what must work: --eval of a .npy without any
tokenizer, an older checkpoint (one note), a vocabulary padded past its tokenizer (those ids are never sampled).

A row's scratch directory d is the identity table's (tests/test_bad_input_identity.py): d/data (the quick demo's
300-token tokenizer and data), d/run (its checkpoints, pointing at d/data) and d/other (a 280-token tokenizer).
"""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bpe
import sample
from conftest import BadInput, check_bad_input, run_cli
from lib.checkpoints import tokenizer_identity
from model import ModelConfig, TransformerLM
from test_bad_input_identity import (OTHER, TRAINED, edit_checkpoint, older_checkpoint, other_tokenizer,  # noqa: F401
                                     own_tokenizer_copy_changed, scratch, tokenizer_dir_gone)

E = "sample.py: error: "
CKPT = "{d}/run/last.pt"
SAMPLE = [CKPT, "--device", "cpu", "--max-new-tokens", "3", "--seed", "0"]
NO_TOKENIZER_FILES = " has no vocab.json and merges.txt: pass --tokenizer DIR (a directory bpe.py train/prepare wrote)"
SMALLER = ("--tokenizer {d}/other has 280 tokens but the model's vocabulary has 300: the model could sample ids "
           "280..299, which it cannot decode, and the checkpoint records no tokenizer to check it against: pass the "
           "tokenizer it was trained with")


def unverifiable(d):
    """A checkpoint from before fingerprints that names no tokenizer: nothing to check a --tokenizer against."""
    edit_checkpoint(d / "run" / "last.pt", drop=("tokenizer_fingerprint", "tokenizer_vocab_size"), tokenizer_dir=None)


def bigger_tokenizer(d):
    """d/big: the demo's tokenizer with 20 more special tokens, 320 in all."""
    tok = bpe.Tokenizer.from_dir(d / "data")
    (d / "big").mkdir()
    bpe.Tokenizer(tok.vocab, tok.merges, tok.special_tokens + [f"<extra{i}>" for i in range(20)]).save_dir(d / "big")


def checkpoint_entries(**changes):
    def setup(d):
        edit_checkpoint(d / "run" / "last.pt", **changes)
    return setup


def model_config(**fields):
    def setup(d):
        ckpt = torch.load(d / "run" / "last.pt", weights_only=True)
        edit_checkpoint(d / "run" / "last.pt", model_config=ckpt["model_config"] | fields)
    return setup


def nan_weights(d):
    ckpt = torch.load(d / "run" / "last.pt", weights_only=True)
    edit_checkpoint(d / "run" / "last.pt", model={k: torch.full_like(v, math.nan) if v.is_floating_point() else v
                                                  for k, v in ckpt["model"].items()})


def write_bytes(name: str, data: bytes):
    def setup(d):
        (d / name).write_bytes(data)
    return setup


def save_npy(name: str, array):
    def setup(d):
        np.save(d / name, array)
    return setup


def truncated(src: str, name: str, n: int):
    def setup(d):
        (d / name).write_bytes((d / src).read_bytes()[:n])
    return setup


ROWS = [
    # the tokenizer: the checkpoint's own, or refused at load (not mid-output)
    BadInput("tokenizer-other-smaller", [*SAMPLE, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + TRAINED + ", from {d}/data): drop --tokenizer, or pass the "
                 "tokenizer it was trained with"),
    BadInput("tokenizer-smaller-nothing-to-check-against", [*SAMPLE, "--tokenizer", "{d}/other"], 2, E + SMALLER,
             setup=unverifiable),
    BadInput("tokenizer-smaller-older-checkpoint-dir-gone", [*SAMPLE, "--tokenizer", "{d}/other"], 2, E + SMALLER,
             setup=tokenizer_dir_gone(older_checkpoint)),
    BadInput("tokenizer-larger", [*SAMPLE, "--tokenizer", "{d}/big"], 2,
             E + "--tokenizer {d}/big has 320 tokens but the model's vocabulary has 300: wrong --tokenizer for this "
                 "checkpoint?", setup=lambda d: (unverifiable(d), bigger_tokenizer(d))),
    BadInput("tokenizer-dir-gone", SAMPLE, 2,
             E + "tokenizer directory {d}/tok (named by the checkpoint's tokenizer_dir)" + NO_TOKENIZER_FILES,
             setup=tokenizer_dir_gone()),
    BadInput("eval-text-tokenizer-dir-gone", [*SAMPLE, "--eval", "{d}/data/valid.txt"], 2,
             E + "tokenizer directory {d}/tok (named by the checkpoint's tokenizer_dir)" + NO_TOKENIZER_FILES,
             setup=tokenizer_dir_gone()),
    BadInput("own-tokenizer-dir-changed", SAMPLE, 2,
             E + "the checkpoint's tokenizer_dir {d}/tok " + OTHER + TRAINED + "): its files changed since the "
                 "checkpoint was written: restore them, or pass --tokenizer with the tokenizer it was trained with",
             setup=own_tokenizer_copy_changed),
    BadInput("older-checkpoint-tokenizer-other", [*SAMPLE, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + "checkpoint {d}/run/last.pt's tokenizer_dir {d}/data holds "
                 "tokenizer <*> (300 tokens): drop --tokenizer, or pass the tokenizer it was trained with",
             setup=older_checkpoint),
    BadInput("tokenizer-missing", [*SAMPLE, "--tokenizer", "{d}/nope"], 2,
             E + "tokenizer directory {d}/nope (named by --tokenizer)" + NO_TOKENIZER_FILES),
    # the checkpoint
    BadInput("checkpoint-missing", ["{d}/nope.pt"], 2,
             E + "checkpoint {d}/nope.pt does not exist: pass a .pt file train.py wrote (e.g. RUN/last.pt)"),
    BadInput("checkpoint-is-a-directory", ["{d}/run"], 2,
             E + "checkpoint {d}/run is a directory: pass a .pt file train.py wrote (e.g. {d}/run/last.pt)"),
    BadInput("checkpoint-truncated", ["{d}/cut.pt"], 2,
             E + "checkpoint {d}/cut.pt is corrupt or not a train.py checkpoint (<*>); pass a checkpoint train.py "
                 "wrote (RUN/last.pt or RUN/best.pt)",
             setup=truncated("run/last.pt", "cut.pt", 5000)),
    BadInput("checkpoint-garbage", ["{d}/junk.pt"], 2,
             E + "checkpoint {d}/junk.pt is corrupt or not a train.py checkpoint (UnpicklingError: <*>); pass a "
                 "checkpoint train.py wrote (RUN/last.pt or RUN/best.pt)", setup=write_bytes("junk.pt", b"not a checkpoint at all")),
    BadInput("checkpoint-of-something-else", ["{d}/dict.pt"], 2,
             E + "checkpoint {d}/dict.pt is not a train.py checkpoint (no 'model'/'iteration' entries)",
             setup=lambda d: torch.save({"weights": torch.zeros(2)}, d / "dict.pt")),
    BadInput("checkpoint-without-model-config", SAMPLE, 2,
             E + "checkpoint {d}/run/last.pt has no 'model_config' entry: not written by train.py",
             setup=lambda d: edit_checkpoint(d / "run" / "last.pt", drop=("model_config",))),
    BadInput("checkpoint-unknown-config-field", SAMPLE, 2,
             E + "checkpoint {d}/run/last.pt: model_config has unknown fields ['flux']; was it written by a newer "
                 "model.py?", setup=model_config(flux=1)),
    BadInput("checkpoint-weights-do-not-fit", SAMPLE, 2,
             E + "checkpoint {d}/run/last.pt: weights do not match the model (<*>)", setup=model_config(d_model=64)),
    BadInput("checkpoint-nan-weights", SAMPLE, 1,
             E + "logits contain NaN: the model's weights or inputs are broken (a diverged checkpoint?); refusing to "
                 "sample from them", setup=nan_weights),
    # flags
    BadInput("temperature-negative", [*SAMPLE, "--temperature", "-1"], 2,
             E + "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    BadInput("temperature-not-a-number", [*SAMPLE, "--temperature", "hot"], 2,
             E + "argument --temperature: invalid float value: 'hot' (see --help)"),
    BadInput("top-p-zero", [*SAMPLE, "--top-p", "0"], 2, E + "top_p must be in (0, 1] (1 = off), got 0.0"),
    BadInput("top-k-zero", [*SAMPLE, "--top-k", "0"], 2,
             E + "top_k must be a positive integer, or None for off, got 0"),
    BadInput("max-new-tokens-negative", [*SAMPLE, "--max-new-tokens", "-1"], 2,
             E + "--max-new-tokens must be >= 0, got -1"),
    BadInput("num-samples-zero", [*SAMPLE, "--num-samples", "0"], 2, E + "--num-samples must be >= 1, got 0"),
    BadInput("unknown-flag", [*SAMPLE, "--temprature", "1"], 2,
             E + "unrecognized arguments: --temprature 1 (see --help)"),
    BadInput("device-not-a-device", [CKPT, "--device", "gpu0"], 2,
             E + "--device 'gpu0' is not a device name (try cuda, cuda:0, mps or cpu)"),
    # --eval FILE
    BadInput("eval-missing", [*SAMPLE, "--eval", "{d}/nope.npy"], 2,
             E + "--eval file {d}/nope.npy does not exist: pass a .npy of token ids (bpe.py encode) or a text file"),
    BadInput("eval-npy-2d", [*SAMPLE, "--eval", "{d}/ids.npy"], 2,
             E + "--eval {d}/ids.npy: expected a 1-D array of integer token ids, got shape (2, 3) dtype int64",
             setup=save_npy("ids.npy", np.zeros((2, 3), dtype=np.int64))),
    BadInput("eval-npy-garbage", [*SAMPLE, "--eval", "{d}/ids.npy"], 2,
             E + "--eval {d}/ids.npy is not a readable .npy array of token ids (ValueError: <*>): write one with "
                 "python bpe.py encode", setup=write_bytes("ids.npy", b"garbage\n")),
    BadInput("eval-npy-truncated", [*SAMPLE, "--eval", "{d}/cut.npy"], 2,
             E + "--eval {d}/cut.npy is not a readable .npy array of token ids (ValueError: mmap length is greater "
                 "than file size): write one with python bpe.py encode",
             setup=truncated("data/valid.npy", "cut.npy", 200)),
    BadInput("eval-npy-empty-file", [*SAMPLE, "--eval", "{d}/empty.npy"], 2,
             E + "--eval {d}/empty.npy is not a readable .npy array of token ids (EOFError: No data left in file): "
                 "write one with python bpe.py encode", setup=write_bytes("empty.npy", b"")),
    BadInput("eval-ids-past-the-vocabulary", [*SAMPLE, "--eval", "{d}/ids.npy"], 2,
             E + "--eval {d}/ids.npy: token id 300 at position 300 of {d}/ids.npy is outside the model's vocabulary "
                 "[0, 300): the data was encoded with another tokenizer (use matching data, or the tokenizer's "
                 "--vocab-size)", setup=save_npy("ids.npy", np.arange(400, dtype=np.uint16))),
    BadInput("eval-one-token", [*SAMPLE, "--eval", "{d}/ids.npy"], 2,
             E + "--eval {d}/ids.npy: need at least 2 tokens to score one prediction, got 1",
             setup=save_npy("ids.npy", np.array([5], dtype=np.uint16))),
    BadInput("eval-stride-zero", [*SAMPLE, "--eval", "{d}/data/valid.npy", "--eval-stride", "0"], 2,
             E + "--eval {d}/data/valid.npy: stride must be in [1, context_length=32], got 0"),
    BadInput("eval-text-not-utf8", [*SAMPLE, "--eval", "{d}/latin1.txt"], 2,
             E + "--eval {d}/latin1.txt is not UTF-8 text (invalid continuation byte at byte 3): pass UTF-8 text, or "
                 "a .npy of token ids", setup=write_bytes("latin1.txt", "caf\xe9 au lait".encode("latin-1"))),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row, tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    check_bad_input(row, sample.main, tmp_path, capsys)


# --- what must work -----------------------------------------------------------------------------------------------


def test_eval_of_ids_needs_no_tokenizer(tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    tokenizer_dir_gone()(tmp_path)
    code, out, err = run_cli(sample.main, [tmp_path / "run" / "last.pt", "--device", "cpu",
                                           "--eval", tmp_path / "data" / "valid.npy"], capsys)
    assert code == 0 and err == "", err
    assert "nats/token" in out and "perplexity" in out


def test_an_older_checkpoint_samples_with_one_note(tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    older_checkpoint(tmp_path)
    code, out, err = run_cli(sample.main, [a.format(d=tmp_path) for a in SAMPLE], capsys)
    assert code == 0 and "=== end of sample 1/1" in out
    assert err == (f"note: checkpoint {tmp_path}/run/last.pt records no tokenizer fingerprint (older checkpoints do "
                   f"not): cannot verify that {tmp_path}/data is the tokenizer it was trained with\n")


class FavoursId310(torch.nn.Module):
    """A stand-in model over 320 ids whose logits always put id 310 first and id 7 second."""
    config = SimpleNamespace(context_length=8)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # (generate_stream reads the device off a parameter)

    def forward(self, x, kv_cache=None):
        logits = torch.zeros(*x.shape, 320)
        logits[..., 310], logits[..., 7] = 10.0, 5.0
        return logits


def test_ids_past_the_tokenizer_are_never_sampled():
    steps = list(sample.generate_stream(FavoursId310(), [1, 2], 4, temperature=0, use_cache=False, n_tokens=300))
    assert [int(s) for s in steps] == [7] * 4
    assert int(next(sample.generate_stream(FavoursId310(), [1, 2], 1, temperature=0, use_cache=False))) == 310


def test_a_vocabulary_padded_past_its_tokenizer_samples(tmp_path, capsys, quick_demo, other_tokenizer):
    # train.py --vocab-size 320 with the 300-token tokenizer (or an imported model's padded embedding): the
    # checkpoint's own tokenizer is smaller than the model, and that is fine
    scratch(tmp_path, quick_demo, other_tokenizer)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    cfg = dataclasses.replace(ModelConfig(**ckpt["model_config"]), vocab_size=320)
    torch.manual_seed(0)
    model = TransformerLM(**dataclasses.asdict(cfg))
    with torch.no_grad():
        model.lm_head.weight[300:] *= 30  # so that, unmasked, the ids past the tokenizer would be drawn often
    edit_checkpoint(tmp_path / "run" / "last.pt", model=model.state_dict(), model_config=dataclasses.asdict(cfg),
                    **tokenizer_identity(tmp_path / "data"))
    code, out, err = run_cli(sample.main, [tmp_path / "run" / "last.pt", "--device", "cpu", "--max-new-tokens", "40",
                                           "--seed", "0", "--no-stop-on-eos"], capsys)
    assert code == 0 and err == "", err
    assert "40 new tokens" in out


def test_a_checkpoint_that_cannot_be_read_is_the_machines_fault(tmp_path, capsys, quick_demo, other_tokenizer,
                                                               monkeypatch):
    # (the tests may run as root, which reads any file: the fault is injected at the one torch.load)
    import lib.checkpoints

    def denied(src):
        raise PermissionError(13, "Permission denied", str(src))
    monkeypatch.setattr(lib.checkpoints, "load_weights_only", denied)
    scratch(tmp_path, quick_demo, other_tokenizer)
    code, _, err = run_cli(sample.main, [tmp_path / "run" / "last.pt"], capsys)
    assert (code, err) == (1, f"sample.py: error: cannot read checkpoint {tmp_path}/run/last.pt: permission denied\n")


def test_an_eval_file_that_cannot_be_read_is_the_machines_fault(tmp_path, capsys, quick_demo, other_tokenizer,
                                                                monkeypatch):
    def denied(path, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(np, "load", denied)
    scratch(tmp_path, quick_demo, other_tokenizer)
    ids = tmp_path / "data" / "valid.npy"
    code, _, err = run_cli(sample.main, [tmp_path / "run" / "last.pt", "--device", "cpu", "--eval", ids], capsys)
    assert (code, err) == (1, f"sample.py: error: cannot read {ids}: permission denied\n")
