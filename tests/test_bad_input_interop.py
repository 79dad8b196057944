"""Bad input to `train.py export` and `train.py import` (issue 32): one row per case, the whole one-line message word
for word, the exit code, and the files that must be unchanged or absent afterwards (conftest.BadInput).

Export rows refuse before any write: `--out` must be new, empty or an earlier export (recognised by the mark in its
model.safetensors header) unless --force. Import rows damage one field of a valid Hugging Face directory (the
quick demo's run exported once per module) and check that --out is not created. After the table: what export does
with an earlier export and with --force, and that a failed write or a permission fault leaves the old files.

    python -m pytest tests/test_bad_input_interop.py -q
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from conftest import BadInput, check_bad_input, run_cli
from lib import hf_export

E = "train.py: error: "
STOPPED = "train.py: stopped: "


@pytest.fixture(scope="module")
def hf_dir(quick_demo, tmp_path_factory) -> Path:
    """A valid Hugging Face directory: the quick demo's run/last.pt exported (read-only: rows copy it)."""
    pytest.importorskip("safetensors")
    out = tmp_path_factory.mktemp("hf") / "hf"
    hf_export.export_hf(quick_demo / "run" / "last.pt", out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Setups: each builds the row's bad input in its scratch directory d (which holds demo/ and hf/, copies)
# ---------------------------------------------------------------------------------------------------------------------

def files(named: dict):
    """A setup writing {relative path: text} under d."""
    def setup(d):
        for name, text in named.items():
            path = d / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return setup


def edit_json(name, change):
    """A setup that loads hf/NAME, applies change(obj) (which returns the new object) and writes it back."""
    def setup(d):
        path = d / "hf" / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return setup


def set_config(**fields):
    return edit_json("config.json", lambda obj: {**obj, **fields})


def without(*keys):
    """change(obj) for edit_json: obj without keys, a key "a.b" meaning obj["a"]["b"]."""
    def change(obj):
        for key in keys:
            *outer, last = key.split(".")
            inner = obj
            for k in outer:
                inner = inner[k]
            del inner[last]
        return obj
    return change


def set_in(path, value):
    """change(obj) for edit_json: obj with obj[a][b]... (path "a.b") set to value."""
    def change(obj):
        *outer, last = path.split(".")
        inner = obj
        for k in outer:
            inner = inner[int(k) if isinstance(inner, list) else k]
        inner[int(last) if isinstance(inner, list) else last] = value
        return obj
    return change


def sharded(weight_map=None, index=None):
    """A setup moving hf/model.safetensors to a shard, with an index.json: `index` as given, or {"weight_map": ...}
    (default: every tensor -> the shard)."""
    def setup(d):
        shard = d / "hf" / "model-00001-of-00001.safetensors"
        (d / "hf" / "model.safetensors").rename(shard)
        from safetensors import safe_open
        with safe_open(shard, "pt") as f:
            names = list(f.keys())
        obj = index if index is not None else {
            "weight_map": weight_map if weight_map is not None else {n: shard.name for n in names}}
        (d / "hf" / "model.safetensors.index.json").write_text(json.dumps(obj))
    return setup


def checkpoint(name, change):
    """A setup writing demo/run/NAME: the demo's last.pt passed through change(ckpt)."""
    def setup(d):
        ckpt = torch.load(d / "demo" / "run" / "last.pt", weights_only=True)
        torch.save(change(ckpt), d / "demo" / "run" / name)
    return setup


def nope_model(ckpt):
    """The checkpoint as a NoPE ablation (no RoPE), which Hugging Face Llama cannot express."""
    return {**ckpt, "model_config": {**ckpt["model_config"], "position": "nope"}}


def an_export(d):
    """hf/ is an earlier export (the module's), plus special_tokens_map.json of another model."""
    (d / "hf" / "special_tokens_map.json").write_text('{"pad_token": "<pad>"}')


def a_data_dir(d):
    shutil.copytree(d / "demo" / "data", d / "data")


def truncate(name, size=100):
    def setup(d):
        path = d / name
        path.write_bytes(path.read_bytes()[:size])
    return setup


def sentencepiece(d):
    (d / "hf" / "tokenizer.json").unlink()
    (d / "hf" / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece")


def combine(*setups):
    def setup(d):
        for s in setups:
            s(d)
    return setup


CKPT = "{d}/demo/run/last.pt"
EXPORT_TO_HF = ["export", CKPT, "--out", "{d}/hf"]
IMPORT = ["import", "{d}/hf", "--out", "{d}/run"]
CONFIG, TOKENIZER = "{d}/hf/config.json", "{d}/hf/tokenizer.json"
INDEX = "{d}/hf/model.safetensors.index.json"
NOT_AN_EXPORT = ": pass --force to replace the Hugging Face model and tokenizer files in it and keep the rest, or a " \
                "new or empty directory as --out"

EXPORT_ROWS = [
    BadInput("missing-checkpoint", ["export", "{d}/demo/run/nope.pt", "--out", "{d}/new"], 2,
             E + "checkpoint {d}/demo/run/nope.pt does not exist: pass a .pt file train.py wrote (e.g. RUN/last.pt)",
             absent=("new",)),
    BadInput("checkpoint-is-a-directory", ["export", "{d}/demo/run", "--out", "{d}/new"], 2,
             E + "{d}/demo/run is a directory, not a checkpoint: pass a .pt file in it, e.g. {d}/demo/run/best.pt",
             absent=("new",)),
    BadInput("corrupt-checkpoint", ["export", "{d}/demo/run/last.pt", "--out", "{d}/new"], 2,
             E + "checkpoint {d}/demo/run/last.pt is corrupt or not a train.py checkpoint (<*>",
             setup=truncate("demo/run/last.pt"), absent=("new",)),
    BadInput("checkpoint-without-tokenizer", ["export", "{d}/demo/run/bare.pt", "--out", "{d}/new"], 2,
             E + "checkpoint {d}/demo/run/bare.pt names no tokenizer_dir: pass --tokenizer DIR",
             setup=checkpoint("bare.pt", lambda c: {k: v for k, v in c.items() if k != "tokenizer_dir"}),
             absent=("new",)),
    BadInput("tokenizer-directory-without-tokenizer", ["export", CKPT, "--out", "{d}/new", "--tokenizer", "{d}/hf"],
             2, E + "tokenizer directory {d}/hf (named by --tokenizer) has no vocab.json "
                    "and merges.txt: pass --tokenizer DIR (a directory bpe.py train/prepare wrote)", absent=("new",)),
    BadInput("nope-ablation", ["export", "{d}/demo/run/nope.pt", "--out", "{d}/new"], 2,
             E + "cannot export position='nope': Hugging Face Llama always has RoPE in every attention layer "
                 "(position='rope'); this ablation has no LlamaConfig equivalent",
             setup=checkpoint("nope.pt", nope_model), absent=("new",)),
    BadInput("out-is-a-file", ["export", CKPT, "--out", "{d}/notes.txt"], 2,
             E + "{d}/notes.txt is a file, not a directory: pass a new or empty directory as --out",
             setup=files({"notes.txt": "mine"}), unchanged=("notes.txt",)),
    BadInput("out-holds-another-models-special-tokens-map", ["export", CKPT, "--out", "{d}/other"], 2,
             E + "{d}/other is not empty and not an earlier export (it holds special_tokens_map.json)" + NOT_AN_EXPORT,
             setup=files({"other/special_tokens_map.json": '{"pad_token": "<pad>"}'}), unchanged=("other",)),
    BadInput("out-holds-many-files", ["export", CKPT, "--out", "{d}/other"], 2,
             E + "{d}/other is not empty and not an earlier export (it holds README.md, a.txt, b.txt and 2 more)"
             + NOT_AN_EXPORT,
             setup=files({"other/README.md": "# notes", "other/a.txt": "a", "other/b.txt": "b", "other/c.txt": "c",
                         "other/d.txt": "d"}), unchanged=("other",)),
    BadInput("earlier-export-with-a-file-it-did-not-write", EXPORT_TO_HF, 2,
             E + "{d}/hf is not empty and not an earlier export (it holds special_tokens_map.json)" + NOT_AN_EXPORT,
             setup=an_export, unchanged=("hf",)),
    BadInput("force-into-a-bpe-tokenizer-directory", ["export", CKPT, "--out", "{d}/data", "--force"], 2,
             E + "{d}/data holds special_tokens.json: it is a run or tokenizer directory of this project, whose "
                 "files an export would replace or delete; pass a new or empty directory as --out",
             setup=a_data_dir, unchanged=("data",)),
    BadInput("force-into-a-run-directory", ["export", CKPT, "--out", "{d}/demo/run", "--force"], 2,
             E + "{d}/demo/run holds last.pt: it is a run or tokenizer directory of this project, whose files an "
                 "export would replace or delete; pass a new or empty directory as --out", unchanged=("demo/run",)),
    BadInput("into-its-run-directory", ["export", CKPT, "--out", "{d}/demo/run"], 2,
             E + "{d}/demo/run holds last.pt: it is a run or tokenizer directory of this project, whose files an "
                 "export would replace or delete; pass a new or empty directory as --out", unchanged=("demo/run",)),
    BadInput("export-without-out", ["export", CKPT], 2,
             "train.py export: error: the following arguments are required: --out (see --help)"),
    BadInput("export-unknown-flag", ["export", CKPT, "--out", "{d}/new", "--overwrite"], 2,
             "train.py export: error: unrecognized arguments: --overwrite (see --help)", absent=("new",)),
]

IMPORT_ROWS = [
    BadInput("config-json-given-for-the-directory", ["import", CONFIG, "--out", "{d}/run"], 2,
             E + "{d}/hf/config.json is a file, not a directory: pass the Hugging Face model directory that holds "
                 "it, {d}/hf", absent=("run",)),
    BadInput("missing-directory", ["import", "{d}/nope", "--out", "{d}/run"], 2,
             E + "{d}/nope does not exist: pass a Hugging Face model directory (config.json, model.safetensors, "
                 "tokenizer.json)", absent=("run",)),
    BadInput("not-a-model-directory", ["import", "{d}/demo/run", "--out", "{d}/run"], 2,
             E + "{d}/demo/run/config.json has no 'model_type': is it a Hugging Face Llama config.json?",
             absent=("run",)),
    BadInput("out-is-a-file", ["import", "{d}/hf", "--out", "{d}/notes.txt"], 2,
             E + "{d}/notes.txt is a file, not a directory: pass a new directory (or a run, with --overwrite) as "
                 "--out", setup=files({"notes.txt": "mine"}), unchanged=("notes.txt",)),
    BadInput("out-holds-a-checkpoint", ["import", "{d}/hf", "--out", "{d}/demo/run"], 2,
             E + "{d}/demo/run already holds a checkpoint: pass --overwrite or a new --out", unchanged=("demo/run",)),
    BadInput("out-holds-a-tokenizer", ["import", "{d}/hf", "--out", "{d}/data"], 2,
             E + "{d}/data already holds a tokenizer (vocab.json): pass --overwrite or a new --out",
             setup=a_data_dir, unchanged=("data",)),
    BadInput("sentencepiece", IMPORT, 2,
             E + "{d}/hf has a SentencePiece tokenizer.model: only a byte-level BPE tokenizer.json can be imported",
             setup=sentencepiece, absent=("run",)),
    BadInput("no-tokenizer", IMPORT, 2,
             E + "{d}/hf has no tokenizer.json: only a byte-level BPE tokenizer.json can be imported",
             setup=lambda d: (d / "hf" / "tokenizer.json").unlink(), absent=("run",)),
    # config.json: every field the conversion reads, checked for type and range first
    BadInput("config-not-json", IMPORT, 2, E + CONFIG + " is not valid JSON (<*>)",
             setup=files({"hf/config.json": '{"model_type": "llama",'}), absent=("run",)),
    BadInput("config-a-list", IMPORT, 2,
             E + CONFIG + " holds a list, not a JSON object: is it a Hugging Face config.json?",
             setup=files({"hf/config.json": '[{"model_type": "llama"}]'}), absent=("run",)),
    BadInput("config-without-hidden-size", IMPORT, 2,
             E + CONFIG + " has no 'hidden_size': is it a Hugging Face Llama config.json?",
             setup=edit_json("config.json", without("hidden_size")), absent=("run",)),
    BadInput("rope-theta-null", IMPORT, 2, E + CONFIG + ": rope_theta must be a positive number, got null",
             setup=set_config(rope_theta=None), absent=("run",)),
    BadInput("num-attention-heads-0", IMPORT, 2, E + CONFIG + ": num_attention_heads must be an integer >= 1, got 0",
             setup=set_config(num_attention_heads=0), absent=("run",)),
    BadInput("num-attention-heads-a-string", IMPORT, 2,
             E + CONFIG + ': num_attention_heads must be an integer >= 1, got "2"',
             setup=set_config(num_attention_heads="2"), absent=("run",)),
    BadInput("rope-scaling-a-string", IMPORT, 2, E + CONFIG + ': rope_scaling must be null or an object, got "linear"',
             setup=set_config(rope_scaling="linear"), absent=("run",)),
    BadInput("rope-scaling-linear", IMPORT, 2,
             E + CONFIG + ": rope scaling 'linear' ({{'rope_type': 'linear', 'factor': 2.0}}): model.py's RoPE has "
                          "no scaling, only rope_theta",
             setup=set_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), absent=("run",)),
    BadInput("vocab-size-true", IMPORT, 2, E + CONFIG + ": vocab_size must be an integer >= 1, got true",
             setup=set_config(vocab_size=True), absent=("run",)),
    BadInput("num-hidden-layers-a-float", IMPORT, 2,
             E + CONFIG + ": num_hidden_layers must be an integer >= 1, got 2.5",
             setup=set_config(num_hidden_layers=2.5), absent=("run",)),
    BadInput("rms-norm-eps-negative", IMPORT, 2, E + CONFIG + ": rms_norm_eps must be a positive number, got -1e-05",
             setup=set_config(rms_norm_eps=-1e-5), absent=("run",)),
    BadInput("tie-word-embeddings-a-string", IMPORT, 2,
             E + CONFIG + ': tie_word_embeddings must be true or false, got "false"',
             setup=set_config(tie_word_embeddings="false"), absent=("run",)),
    BadInput("head-dim-0", IMPORT, 2, E + CONFIG + ": head_dim must be an integer >= 1 or null, got 0",
             setup=set_config(head_dim=0), absent=("run",)),
    BadInput("rope-parameters-theta-0", IMPORT, 2,
             E + CONFIG + ": rope_parameters.rope_theta must be a positive number, got 0",
             setup=set_config(rope_parameters={"rope_type": "default", "rope_theta": 0}), absent=("run",)),
    BadInput("rope-parameters-a-list", IMPORT, 2,
             E + CONFIG + ": rope_parameters must be null or an object, got a list",
             setup=set_config(rope_parameters=[]), absent=("run",)),
    BadInput("model-type-a-number", IMPORT, 2, E + CONFIG + ": model_type must be a string, got 5",
             setup=set_config(model_type=5), absent=("run",)),
    BadInput("hidden-size-not-divisible", IMPORT, 2,
             E + CONFIG + ": hidden_size 32 is not divisible by num_attention_heads 3",
             setup=set_config(num_attention_heads=3, num_key_value_heads=3), absent=("run",)),
    BadInput("vocab-size-below-the-tokenizer", IMPORT, 2,
             E + "{d}/hf: tokenizer.json has 300 tokens but config.json's vocab_size is 10",
             setup=set_config(vocab_size=10), absent=("run",)),
    # tokenizer.json
    BadInput("tokenizer-a-list", IMPORT, 2,
             E + TOKENIZER + " holds a list, not a JSON object: is it a Hugging Face tokenizer.json?",
             setup=files({"hf/tokenizer.json": "[]"}), absent=("run",)),
    BadInput("tokenizer-model-a-list", IMPORT, 2,
             E + TOKENIZER + ': model must be an object (the BPE model: "type", "vocab", "merges"), got a list',
             setup=edit_json("tokenizer.json", set_in("model", [])), absent=("run",)),
    BadInput("tokenizer-without-model-vocab", IMPORT, 2,
             E + TOKENIZER + ": model.vocab must be an object of token -> id, got nothing (the key is missing)",
             setup=edit_json("tokenizer.json", without("model.vocab")), absent=("run",)),
    BadInput("tokenizer-vocab-id-a-string", IMPORT, 2,
             E + TOKENIZER + ': model.vocab["a"] must be an integer id >= 0, got "65"',
             setup=edit_json("tokenizer.json", set_in("model.vocab.a", "65")), absent=("run",)),
    BadInput("tokenizer-vocab-id-twice", IMPORT, 2,
             E + TOKENIZER + ': model.vocab gives id 66 to both "B" and "a"',
             setup=edit_json("tokenizer.json", set_in("model.vocab.a", 66)), absent=("run",)),
    BadInput("tokenizer-merges-an-object", IMPORT, 2,
             E + TOKENIZER + ": model.merges must be a list of merges, got an object",
             setup=edit_json("tokenizer.json", set_in("model.merges", {})), absent=("run",)),
    BadInput("tokenizer-merge-of-three", IMPORT, 2,
             E + TOKENIZER + ': model.merges[0] must be "a b" or ["a", "b"], got "a b c"',
             setup=edit_json("tokenizer.json", set_in("model.merges", ["a b c"])), absent=("run",)),
    BadInput("tokenizer-added-token-without-id", IMPORT, 2,
             E + TOKENIZER + ': added_tokens[0] must be an object with an integer "id" >= 0 and a non-empty string '
                             '"content", got an object',
             setup=edit_json("tokenizer.json", set_in("added_tokens", [{"content": "<|endoftext|>"}])),
             absent=("run",)),
    BadInput("tokenizer-pre-tokenizer-a-string", IMPORT, 2,
             E + TOKENIZER + ': pre_tokenizer must be an object or null, got "ByteLevel"',
             setup=edit_json("tokenizer.json", set_in("pre_tokenizer", "ByteLevel")), absent=("run",)),
    BadInput("tokenizer-pretokenizers-a-string", IMPORT, 2,
             E + TOKENIZER + ': pre_tokenizer.pretokenizers must be a list of objects, got "Split"',
             setup=edit_json("tokenizer.json", set_in("pre_tokenizer.pretokenizers", "Split")), absent=("run",)),
    BadInput("tokenizer-added-token-lstrip-a-string", IMPORT, 2,
             E + TOKENIZER + ': added_tokens[0].lstrip must be true or false, got "no"',
             setup=edit_json("tokenizer.json", set_in("added_tokens.0.lstrip", "no")), absent=("run",)),
    BadInput("tokenizer-unigram", IMPORT, 2,
             E + TOKENIZER + ": the model is 'Unigram', not BPE: only byte-level BPE tokenizers can be imported",
             setup=edit_json("tokenizer.json", set_in("model.type", "Unigram")), absent=("run",)),
    # weights and the shard index
    BadInput("index-without-weight-map", IMPORT, 2,
             E + INDEX + ": weight_map must be an object of tensor name -> shard file name, got nothing (the key is "
                         "missing)", setup=sharded(index={"metadata": {}}), absent=("run",)),
    BadInput("index-a-list", IMPORT, 2,
             E + INDEX + ": weight_map must be an object of tensor name -> shard file name, got a list",
             setup=sharded(index=[]), absent=("run",)),
    BadInput("index-escapes-the-directory", IMPORT, 2,
             E + INDEX + ": weight_map names '../model.safetensors', outside {d}/hf: shard files must lie in the "
                         "model directory",
             setup=sharded({"model.norm.weight": "../model.safetensors"}), absent=("run",)),
    BadInput("index-absolute-path", IMPORT, 2,
             E + INDEX + ": weight_map names '/etc/passwd', outside {d}/hf: shard files must lie in the model "
                         "directory", setup=sharded({"model.norm.weight": "/etc/passwd"}), absent=("run",)),
    BadInput("index-names-a-missing-shard", IMPORT, 2,
             E + INDEX + ": weight_map names 'model-00002-of-00002.safetensors', which {d}/hf does not hold",
             setup=sharded({"model.norm.weight": "model-00002-of-00002.safetensors"}), absent=("run",)),
    BadInput("truncated-weights", IMPORT, 2,
             E + "{d}/hf/model.safetensors is corrupt or not a weights file (<*>)",
             setup=truncate("hf/model.safetensors"), absent=("run",)),
    BadInput("no-weights", IMPORT, 2,
             E + "{d}/hf has no model.safetensors or pytorch_model.bin (nor a sharded .index.json)",
             setup=lambda d: (d / "hf" / "model.safetensors").unlink(), absent=("run",)),
    BadInput("import-without-out", ["import", "{d}/hf"], 2,
             "train.py import: error: the following arguments are required: --out (see --help)"),
]


@pytest.fixture
def scratch(tmp_path, quick_demo, hf_dir) -> Path:
    """A row's scratch directory: demo/ (the quick demo) and hf/ (its export), copies the row may damage."""
    shutil.copytree(quick_demo, tmp_path / "demo")
    shutil.copytree(hf_dir, tmp_path / "hf")
    return tmp_path


@pytest.mark.parametrize("row", EXPORT_ROWS + IMPORT_ROWS, ids=lambda r: f"{r.argv[0]}-{r.id}")
def test_bad_input(row, scratch, capsys):
    check_bad_input(row, train.main, scratch, capsys)


# ---------------------------------------------------------------------------------------------------------------------
# What export does with a directory that holds files: an earlier export is replaced whole, --force keeps what is
# not a model file, and a failure or a permission fault leaves everything as it was.
# ---------------------------------------------------------------------------------------------------------------------

def test_an_earlier_export_is_replaced_whole(scratch, capsys):
    export = ["export", str(scratch / "demo/run/best.pt"), "--out", str(scratch / "hf")]
    assert run_cli(train.main, export, capsys)[0] == 0
    assert sorted(p.name for p in (scratch / "hf").iterdir()) == sorted(hf_export.EXPORT_FILES)
    assert not list(scratch.glob(".hf.*")), "the staging directory is left behind"
    # An export whose mark lists a file this version no longer writes: that file goes too.
    (scratch / "hf/special_tokens_map.json").write_text("{}")
    from safetensors.torch import load_file, save_file
    tensors = load_file(scratch / "hf/model.safetensors")
    mark = ",".join(hf_export.EXPORT_FILES + ("special_tokens_map.json",))
    save_file(tensors, scratch / "hf/model.safetensors", metadata={"format": "pt", hf_export.EXPORT_MARK: mark})
    assert run_cli(train.main, export, capsys)[0] == 0
    assert sorted(p.name for p in (scratch / "hf").iterdir()) == sorted(hf_export.EXPORT_FILES)


def test_force_replaces_the_model_files_and_keeps_the_rest(scratch, capsys):
    """(tests/test_hf.py checks that AutoTokenizer then has the model's tokens, not those of the removed files.)"""
    other = scratch / "other"
    files({"other/README.md": "# card", "other/special_tokens_map.json": '{"pad_token": "<pad>"}',
           "other/pytorch_model.bin": "x", "other/added_tokens.json": '{"<a>": 300}'})(scratch)
    code, out, err = run_cli(train.main, ["export", str(scratch / "demo/run/last.pt"), "--out", str(other), "--force"],
                             capsys)
    assert code == 0, err
    assert sorted(p.name for p in other.iterdir()) == sorted(hf_export.EXPORT_FILES + ("README.md",))
    assert (other / "README.md").read_text() == "# card"


def test_a_failed_export_leaves_the_earlier_one_and_no_debris(scratch, capsys, monkeypatch):
    from lib import cli, tokenizer_formats
    before = {p.name: p.read_bytes() for p in (scratch / "hf").iterdir()}

    def full_disk(*args, **kwargs):
        raise cli.WriteFault(scratch / "hf/tokenizer.json", "no space left on device")
    monkeypatch.setattr(tokenizer_formats, "save_hf_tokenizer", full_disk)
    code, _, err = run_cli(train.main, ["export", str(scratch / "demo/run/best.pt"), "--out", str(scratch / "hf")],
                           capsys)
    assert (code, err) == (1, f"{STOPPED}cannot write {scratch}/hf/tokenizer.json: no space left on device\n")
    assert {p.name: p.read_bytes() for p in (scratch / "hf").iterdir()} == before
    assert sorted(p.name for p in scratch.iterdir()) == ["demo", "hf"]
    # into a new nested directory: the directories it made are removed again
    code, _, _ = run_cli(train.main, ["export", str(scratch / "demo/run/best.pt"), "--out", str(scratch / "a/b/hf")],
                         capsys)
    assert code == 1 and sorted(p.name for p in scratch.iterdir()) == ["demo", "hf"]


def test_permission_faults_name_the_path_and_exit_1(scratch, capsys, monkeypatch):
    """(As root, chmod does not deny; the faults are raised where the OS would raise them.)"""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    code, _, err = run_cli(train.main, ["export", str(scratch / "demo/run/last.pt"), "--out", str(scratch / "new")],
                           capsys)
    assert (code, err) == (1, f"{STOPPED}cannot write {scratch}/new: permission denied\n")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", denied)
    code, _, err = run_cli(train.main, ["import", str(scratch / "hf"), "--out", str(scratch / "run")], capsys)
    assert (code, err) == (1, f"{STOPPED}cannot read {scratch}/hf/model.safetensors: permission denied\n")
    monkeypatch.setattr(Path, "read_text", denied)
    code, _, err = run_cli(train.main, ["import", str(scratch / "hf"), "--out", str(scratch / "run")], capsys)
    assert (code, err) == (1, f"{STOPPED}cannot read {scratch}/hf/config.json: permission denied\n")
    assert not (scratch / "new").exists() and not (scratch / "run").exists()


def test_import_writes_nothing_into_out_until_it_succeeds(scratch, capsys, monkeypatch):
    from lib import cli
    (scratch / "run").mkdir()
    (scratch / "run/notes.txt").write_text("mine")

    def full_disk(*args, **kwargs):
        raise cli.WriteFault(scratch / "run/last.pt", "no space left on device")
    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    code, _, err = run_cli(train.main, ["import", str(scratch / "hf"), "--out", str(scratch / "run")], capsys)
    assert code == 1 and sorted(p.name for p in (scratch / "run").iterdir()) == ["notes.txt"], err
    assert sorted(p.name for p in scratch.iterdir()) == ["demo", "hf", "run"]
