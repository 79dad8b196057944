"""Identity checks (issue 32, item 2): a checkpoint is paired only with its own model and its own tokenizer.

The table: train.py --resume with another run's last.pt copied in, --init-from / --resume / export with a tokenizer
that is not the checkpoint's (from --tokenizer, the data directory, or the checkpoint's own tokenizer_dir changed
or gone). Each row: one line on stderr, word for word, exit 2, nothing written. The plain tests below: what the
checkpoints record, that the fingerprints named in the messages are the real ones, and that what should still work
does (an older checkpoint without a fingerprint, a moved tokenizer whose copy is beside the data).

A row's scratch directory d holds a copy of the session's quick demo: d/data (its 300-token tokenizer and data),
d/run (last.pt pointing at d/data) and d/other, a 280-token tokenizer trained on the same text.
"""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import bpe
import train
from conftest import BadInput, check_bad_input, run_cli
from lib.checkpoints import TOKENIZER_FILES, tokenizer_fingerprint
from model import ModelConfig, TransformerLM

QUICK = ["--max-iters", "1", "--warmup-iters", "0", "--eval-iters", "1", "--log-interval", "1", "--batch-size", "2",
         "--device", "cpu", "--peak-flops", "0"]  # a run of one step, for the commands that should work


@pytest.fixture(scope="module")
def other_tokenizer(quick_demo, tmp_path_factory) -> Path:
    """A 280-token BPE of the demo's own training text: another tokenizer, with the same bytes and special token."""
    out = tmp_path_factory.mktemp("other_tokenizer")
    vocab, merges = bpe.train_bpe(quick_demo / "data" / "train.txt", 280, [bpe.END_OF_TEXT], fast=True, num_workers=1)
    bpe.Tokenizer(vocab, merges, [bpe.END_OF_TEXT]).save_dir(out)
    return out


def edit_checkpoint(path: Path, drop=(), **changes) -> None:
    """Rewrite a checkpoint with some entries changed or dropped (as an older or another train.py wrote it)."""
    ckpt = torch.load(path, weights_only=True)
    for key in drop:
        ckpt.pop(key, None)
    torch.save(ckpt | changes, path)


def scratch(d: Path, quick_demo: Path, other: Path) -> None:
    """d/data, d/run (its checkpoint and config.json pointing at d/data) and d/other: see the banner."""
    shutil.copytree(quick_demo / "data", d / "data")
    shutil.copytree(quick_demo / "run", d / "run")
    shutil.copytree(other, d / "other")
    ckpt = torch.load(d / "run" / "last.pt", weights_only=True)
    paths = dict(data=str(d / "data"), tokenizer=str(d / "data"), out=str(d / "run"))
    edit_checkpoint(d / "run" / "last.pt", tokenizer_dir=str(d / "data"), train_args=ckpt["train_args"] | paths)
    config = json.loads((d / "run" / "config.json").read_text())
    (d / "run" / "config.json").write_text(json.dumps(config | paths, indent=2) + "\n")


# --- what the rows' setups do to the scratch copy -----------------------------------------------------------------


def another_model(**fields):
    """last.pt replaced by another run's: a model of another config, in train.py's checkpoint format."""
    def setup(d):
        ckpt = torch.load(d / "run" / "last.pt", weights_only=True)
        cfg = dataclasses.replace(ModelConfig(**ckpt["model_config"]), **fields)
        ckpt.update(model=TransformerLM(**dataclasses.asdict(cfg)).state_dict(), model_config=dataclasses.asdict(cfg))
        torch.save(ckpt, d / "run" / "last.pt")
    return setup


def write(name: str, text: str):
    def setup(d):
        (d / name).write_text(text)
    return setup


def other_tokenizer_in(name: str):
    """d/name holds the other tokenizer's files (a data directory: with the demo's .npy files too)."""
    def setup(d):
        (d / name).mkdir(exist_ok=True)
        for f in ("train.npy", "valid.npy"):
            if not (d / name / f).exists():
                shutil.copy(d / "data" / f, d / name / f)
        for f in TOKENIZER_FILES:
            shutil.copy(d / "other" / f, d / name / f)
    return setup


def tokenizer_dir_gone(*then):
    """The checkpoint (and the run's recorded --tokenizer) name d/tok, a directory that no longer exists."""
    def setup(d):
        ckpt = torch.load(d / "run" / "last.pt", weights_only=True)
        edit_checkpoint(d / "run" / "last.pt", tokenizer_dir=str(d / "tok"),
                        train_args=ckpt["train_args"] | {"tokenizer": str(d / "tok")})
        for step in then:
            step(d)
    return setup


def own_tokenizer_copy_changed(d):
    """The checkpoint's tokenizer_dir is d/tok, which now holds the other tokenizer; d/data is intact."""
    (d / "tok").mkdir()
    for f in TOKENIZER_FILES:
        shutil.copy(d / "other" / f, d / "tok" / f)
    edit_checkpoint(d / "run" / "last.pt", tokenizer_dir=str(d / "tok"))


def older_checkpoint(d):
    """last.pt as train.py wrote it before tokenizer fingerprints."""
    edit_checkpoint(d / "run" / "last.pt", drop=("tokenizer_fingerprint", "tokenizer_vocab_size"))


def damaged_tokenizer(d):
    shutil.copytree(d / "data", d / "bad", ignore=shutil.ignore_patterns("*.npy", "train.txt", "valid.txt"))
    (d / "bad" / "vocab.json").write_text("{bad")


# --- the table ----------------------------------------------------------------------------------------------------

E = "train.py: error: "
TRAINED = "checkpoint {d}/run/last.pt was trained with tokenizer <*> (300 tokens"
OTHER = "holds tokenizer <*> (280 tokens) but "
FIX_FLAG = ": drop --tokenizer, or pass the tokenizer it was trained with"
FIX_DATA = ": point --data at data encoded with the checkpoint's tokenizer (python bpe.py encode --tokenizer DIR ...)"
FIX_OWN = (": its files changed since the checkpoint was written: restore them, or pass --tokenizer with the "
           "tokenizer it was trained with")
ANOTHER_MODEL = ("{d}/run/last.pt holds another model than {d}/run/config.json describes (%s): put this run's own "
                 "checkpoint back, or start a new run from that one with --init-from {d}/run/last.pt --out NEW_DIR")
RESUME = ["--resume", "{d}/run"]
INIT = ["--data", "{d}/data", "--init-from", "{d}/run/last.pt", "--out", "{d}/new", *QUICK]
RUN_UNCHANGED = ("run/config.json", "run/log.jsonl", "run/last.pt")
EXPORT = ["export", "{d}/run/last.pt", "--out", "{d}/hf"]
NO_TOKENIZER_FILES = " has no vocab.json and merges.txt: pass --tokenizer DIR (a directory bpe.py train/prepare wrote)"

ROWS = [
    # --resume with another run's last.pt copied into RUN: refused before config.json or log.jsonl are touched
    BadInput("resume-nope-last-pt", RESUME, 2, E + ANOTHER_MODEL % "position nope in last.pt, rope in config.json",
             setup=another_model(position="nope"), unchanged=RUN_UNCHANGED),
    BadInput("resume-d-model-64-last-pt", RESUME, 2, E + ANOTHER_MODEL % "d_model 64 in last.pt, 32 in config.json",
             setup=another_model(d_model=64), unchanged=RUN_UNCHANGED),
    BadInput("resume-last-pt-two-fields-differ", RESUME, 2,
             E + ANOTHER_MODEL % "d_model 64 in last.pt, 32 in config.json; num_layers 3 in last.pt, 2 in config.json",
             setup=another_model(d_model=64, num_layers=3), unchanged=RUN_UNCHANGED),
    BadInput("resume-config-json-not-json", RESUME, 2,
             E + "{d}/run/config.json is not valid JSON (JSONDecodeError: Expecting value: line 1 column 1 (char 0)): "
                 "restore it, or remove it to resume {d}/run/last.pt as it is",
             setup=write("run/config.json", "not json"), unchanged=RUN_UNCHANGED),
    BadInput("resume-config-json-not-object", RESUME, 2,
             E + "{d}/run/config.json is not a JSON object of flags: restore it, or remove it to resume "
                 "{d}/run/last.pt as it is",
             setup=write("run/config.json", "[1, 2]"), unchanged=RUN_UNCHANGED),
    BadInput("resume-model-flag-differs", [*RESUME, "--d-model", "64"], 2,
             E + "checkpoint {d}/run/last.pt has a different model config (d_model 32 vs 64): resume without model "
                 "flags, or start a new --out", unchanged=RUN_UNCHANGED),
    # --resume with a tokenizer that is not the checkpoint's
    BadInput("resume-tokenizer-other", [*RESUME, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + TRAINED + ", from {d}/data)" + FIX_FLAG, unchanged=RUN_UNCHANGED),
    BadInput("resume-data-dir-now-holds-another-tokenizer", RESUME, 2,
             E + "the checkpoint's tokenizer_dir {d}/data " + OTHER + TRAINED + ")" + FIX_OWN,
             setup=other_tokenizer_in("data"), unchanged=RUN_UNCHANGED),
    BadInput("resume-data-elsewhere-another-tokenizer", [*RESUME, "--data", "{d}/data2"], 2,
             E + "the data directory {d}/data2 " + OTHER + TRAINED + ", from {d}/data)" + FIX_DATA,
             setup=other_tokenizer_in("data2"), unchanged=RUN_UNCHANGED),
    BadInput("resume-tokenizer-dir-gone-data-has-another", RESUME, 2,
             E + "the data directory {d}/data " + OTHER + TRAINED + ", from {d}/tok, now gone)" + FIX_DATA,
             setup=tokenizer_dir_gone(other_tokenizer_in("data")), unchanged=RUN_UNCHANGED),
    BadInput("resume-own-tokenizer-right-but-data-dir-changed", [*RESUME, "--tokenizer", "{d}/tok"], 2,
             E + "the data directory {d}/data " + OTHER + TRAINED + ", from {d}/data)" + FIX_DATA,
             setup=lambda d: (shutil.copytree(d / "data", d / "tok"), other_tokenizer_in("data")(d)),
             unchanged=RUN_UNCHANGED),
    # --init-from: a new run from a checkpoint's weights
    BadInput("init-from-tokenizer-other", [*INIT, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + TRAINED + ", from {d}/data)" + FIX_FLAG, absent=("new",)),
    BadInput("init-from-data-dir-another-tokenizer", [*INIT, "--data", "{d}/data2"], 2,
             E + "the data directory {d}/data2 " + OTHER + TRAINED + ", from {d}/data)" + FIX_DATA,
             setup=other_tokenizer_in("data2"), absent=("new",)),
    BadInput("init-from-tokenizer-dir-gone-data-has-another", INIT, 2,
             E + "the data directory {d}/data " + OTHER + TRAINED + ", from {d}/tok, now gone)" + FIX_DATA,
             setup=tokenizer_dir_gone(other_tokenizer_in("data")), absent=("new",)),
    BadInput("init-from-own-tokenizer-dir-changed", INIT, 2,
             E + "the checkpoint's tokenizer_dir {d}/tok " + OTHER + TRAINED + ")" + FIX_OWN,
             setup=own_tokenizer_copy_changed, absent=("new",)),
    BadInput("init-from-older-checkpoint-tokenizer-other", [*INIT, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + "checkpoint {d}/run/last.pt's tokenizer_dir {d}/data holds "
                 "tokenizer <*> (300 tokens)" + FIX_FLAG, setup=older_checkpoint, absent=("new",)),
    BadInput("init-from-tokenizer-missing", [*INIT, "--tokenizer", "{d}/nope"], 2,
             E + "tokenizer directory {d}/nope (named by --tokenizer)" + NO_TOKENIZER_FILES, absent=("new",)),
    BadInput("init-from-tokenizer-damaged", [*INIT, "--tokenizer", "{d}/bad"], 2,
             E + "tokenizer directory {d}/bad (named by --tokenizer): {d}/bad/vocab.json is not valid JSON (<*>); "
                 "expected {{token: id}}", setup=damaged_tokenizer, absent=("new",)),
    BadInput("init-from-a-directory", [*INIT[:2], "--init-from", "{d}/run", *INIT[4:]], 2,
             E + "checkpoint {d}/run is a directory: pass a .pt file train.py wrote (e.g. {d}/run/last.pt)",
             absent=("new",)),
    # train.py export: the tokenizer written beside the weights must be the model's
    BadInput("export-tokenizer-other", [*EXPORT, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + TRAINED + ", from {d}/data)" + FIX_FLAG, absent=("hf",)),
    BadInput("export-own-tokenizer-dir-changed", EXPORT, 2,
             E + "the checkpoint's tokenizer_dir {d}/tok " + OTHER + TRAINED + ")" + FIX_OWN,
             setup=own_tokenizer_copy_changed, absent=("hf",)),
    BadInput("export-tokenizer-dir-gone", EXPORT, 2,
             E + "tokenizer directory {d}/tok (named by the checkpoint's tokenizer_dir)" + NO_TOKENIZER_FILES,
             setup=tokenizer_dir_gone(), absent=("hf",)),
    BadInput("export-older-checkpoint-tokenizer-other", [*EXPORT, "--tokenizer", "{d}/other"], 2,
             E + "--tokenizer {d}/other " + OTHER + "checkpoint {d}/run/last.pt's tokenizer_dir {d}/data holds "
                 "tokenizer <*> (300 tokens)" + FIX_FLAG, setup=older_checkpoint, absent=("hf",)),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input(row, tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    check_bad_input(row, train.main, tmp_path, capsys)


# --- what the checkpoints record, and what still works ------------------------------------------------------------


def test_the_fingerprints_in_a_refusal_are_the_two_tokenizers(tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    code, _, err = run_cli(train.main, ["export", tmp_path / "run" / "last.pt", "--out", tmp_path / "hf",
                                        "--tokenizer", tmp_path / "other"], capsys)
    got, want = re.findall(r"holds tokenizer (\w+) .* trained with tokenizer (\w+) ", err)[0]
    assert code == 2 and got == tokenizer_fingerprint(bpe.Tokenizer.from_dir(other_tokenizer))
    assert want == tokenizer_fingerprint(bpe.Tokenizer.from_dir(quick_demo / "data"))


def test_the_fingerprint_is_what_the_tokenizer_is_not_where(tmp_path, quick_demo):
    tok = bpe.Tokenizer.from_dir(quick_demo / "data")
    (tmp_path / "copy").mkdir()
    tok.save_dir(tmp_path / "copy")
    assert tokenizer_fingerprint(bpe.Tokenizer.from_dir(tmp_path / "copy")) == tokenizer_fingerprint(tok)
    assert re.fullmatch("[0-9a-f]{16}", tokenizer_fingerprint(tok))
    # one merge fewer (and its token): another tokenizer, another fingerprint
    (a, b) = tok.merges[-1]
    fewer = bpe.Tokenizer({i: t for i, t in tok.vocab.items() if t != a + b}, tok.merges[:-1], tok.special_tokens)
    assert tokenizer_fingerprint(fewer) != tokenizer_fingerprint(tok)


def test_every_checkpoint_with_a_tokenizer_records_it(tmp_path, quick_demo):
    expected = tokenizer_fingerprint(bpe.Tokenizer.from_dir(quick_demo / "data"))
    for name in ("last.pt", "best.pt"):  # written by lib/runs.write_checkpoint
        ckpt = torch.load(quick_demo / "run" / name, weights_only=True)
        assert (ckpt["tokenizer_fingerprint"], ckpt["tokenizer_vocab_size"]) == (expected, 300)
    model = TransformerLM(vocab_size=300, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    train.save_checkpoint(model, None, 0, tmp_path / "a.pt", tokenizer_dir=str(quick_demo / "data"))  # the handout's
    train.save_checkpoint(model, None, 0, tmp_path / "b.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["tokenizer_fingerprint"] == expected
    assert "tokenizer_fingerprint" not in torch.load(tmp_path / "b.pt", weights_only=True)


def test_an_older_checkpoint_still_starts_a_run_with_one_note(tmp_path, capsys, quick_demo, other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    older_checkpoint(tmp_path)
    code, _, err = run_cli(train.main, [a.format(d=tmp_path) for a in INIT], capsys)
    assert code == 0, err
    assert err == (f"note: checkpoint {tmp_path}/run/last.pt records no tokenizer fingerprint (older checkpoints do "
                   f"not): cannot verify that {tmp_path}/data is the tokenizer it was trained with\n")
    new = torch.load(tmp_path / "new" / "last.pt", weights_only=True)  # and the new run's checkpoints record it
    assert new["tokenizer_fingerprint"] == tokenizer_fingerprint(bpe.Tokenizer.from_dir(tmp_path / "data"))


def test_resume_takes_the_same_tokenizer_beside_the_data_when_its_own_is_gone(tmp_path, capsys, quick_demo,
                                                                              other_tokenizer):
    scratch(tmp_path, quick_demo, other_tokenizer)
    tokenizer_dir_gone()(tmp_path)  # d/tok is gone, d/data holds the same tokenizer: nothing is wrong
    code, _, err = run_cli(train.main, ["--resume", tmp_path / "run", "--max-iters", "21"], capsys)
    assert code == 0 and err == "", err
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 21 and ckpt["tokenizer_dir"] == str((tmp_path / "data").resolve())
