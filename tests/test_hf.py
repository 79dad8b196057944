"""Tests of sharing with the ecosystem, against the real libraries (dev dependencies; a test skips when its library
is missing).

Tokenizers: exported as Hugging Face tokenizer.json (read by `tokenizers.Tokenizer.from_file` and transformers'
AutoTokenizer) and as a .tiktoken file (read by `tiktoken.Encoding`, also through the printed one-liner) they give the
ids of `bpe.Tokenizer.encode` and decode back, on texts with special tokens, 10,000 seeded random Unicode strings and,
when ../shared is present, kernel-docs-valid and tinyshakespeare; a tokenizer.json (ours, or as HF writes GPT-2's)
reads back into the same Tokenizer.
Models: `train.py export` gives transformers' AutoModelForCausalLM our logits (fp32, 1e-4; untied and tied heads, two
rope thetas) and its greedy `generate` the ids of `sample.generate` at temperature 0; `train.py import` of a random
LlamaForCausalLM (safetensors, .bin, shards, tied, bf16) gives its logits, and sample.py samples and evaluates it;
export -> import -> export is bit for bit.
Runs: `--init-from` starts a new run from a checkpoint's weights (step 0 evaluates exactly those weights; fresh
optimizer, schedule and step), also to fine-tune an imported model; `--wandb` (offline) gets every log.jsonl row and
config.json as its config.
Every refusal (ablations, GQA, biases, rope scaling, other activations/eps, non-byte-level tokenizers, disagreeing
model flags or tokenizers, missing packages and files) is tested by its one-line message.

    python -m pytest tests/test_hf.py      # ~1 min on 2 cores, much of it importing transformers
    python -m pytest -m slow                       # the slow end-to-end checks of the whole suite
"""
import dataclasses
import json
import random
import subprocess
import sys

import pytest
import torch

import bpe
import sample
import train
import lib.checkpoints
import lib.runs
from lib import datasets, tokenizer_formats
from model import ModelConfig, TransformerLM
from test_bpe import PARITY_TEXTS, random_text, random_unicode

EOT = bpe.END_OF_TEXT
# Special tokens that exercise the tricky cases: one with a space (not a byte-level string), one that is two EOTs
# (the longest match must win), one with non-ASCII characters.
SPECIALS = [EOT, "<|pad me|>", EOT + EOT, "<|日本|>"]
SPECIAL_TEXTS = [f"a{EOT}b <|pad me|> c{EOT}{EOT}{EOT}<|pad me|>x", f"{EOT}", f" <|日本|>日本<|日本|> {EOT}\n",
                 "<|endof", "<|pad  me|> <|pad me|"]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers under test, each exported through `bpe.py export` and loaded by the three libraries
# ---------------------------------------------------------------------------------------------------------------------

def trained_tokenizer(tmp_path) -> bpe.Tokenizer:
    """A small tokenizer over mixed text with whitespace runs and Unicode (merges with spaces, newlines, multi-byte
    characters), with SPECIALS."""
    rng = random.Random(11)
    text = random_text(rng, 6000, alphabet="abcdefghij", specials=[EOT]) + "".join(
        random_unicode(rng, 80) + "\n\n    " for _ in range(100))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return bpe.Tokenizer(*bpe.train_bpe(path, 700, SPECIALS, num_workers=1), SPECIALS)


@pytest.fixture(scope="module", params=["trained", "kernel-docs", "gpt2"])
def tokenizer(request, tmp_path_factory):
    """(name, bpe.Tokenizer): a small trained one; one trained on 1 MB of kernel-docs-train (../shared); GPT-2's
    (../shared/fixtures), whose ids are not in byte order."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "trained":
        return request.param, trained_tokenizer(tmp)
    shared = request.getfixturevalue("shared_dir")
    if request.param == "gpt2":
        return request.param, bpe.Tokenizer.from_files(*request.getfixturevalue("gpt2_files"), special_tokens=[EOT])
    corpus = tmp / "kernel-1mb.txt"
    corpus.write_bytes((shared / "data" / "kernel-docs-train.txt").read_bytes()[:1_000_000].rsplit(b"\n", 1)[0])
    return request.param, bpe.Tokenizer(*bpe.train_bpe(corpus, 2000, [EOT], num_workers=1), [EOT])


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """The tokenizer, and what each library loads from `bpe.py export`: {"tokenizers": ..., "AutoTokenizer": ...,
    "tiktoken": ...}, each as an (encode, decode) pair of functions over str and list[int]."""
    tokenizers = pytest.importorskip("tokenizers")
    tiktoken = pytest.importorskip("tiktoken")
    transformers = pytest.importorskip("transformers")
    import tiktoken.load
    name, tok = tokenizer
    tmp = tmp_path_factory.mktemp(f"{name}-export")
    (tmp / "tok").mkdir()
    tok.save_dir(tmp / "tok")
    assert bpe.main(["export", "--tokenizer", str(tmp / "tok"), "--format", "hf", "--out", str(tmp / "hf")]) == 0
    assert bpe.main(["export", "--tokenizer", str(tmp / "tok"), "--format", "tiktoken",
                     "--out", str(tmp / "tok.tiktoken")]) == 0
    hf = tokenizers.Tokenizer.from_file(str(tmp / "hf" / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(tmp / "hf")
    enc = tiktoken.Encoding(name=name, pat_str=bpe.GPT2_PAT, special_tokens=tok.special_token_ids,
                            mergeable_ranks=tiktoken.load.load_tiktoken_bpe(str(tmp / "tok.tiktoken")))
    return tok, {
        "tokenizers": (lambda s: hf.encode(s).ids, lambda ids: hf.decode(ids, skip_special_tokens=False)),
        "AutoTokenizer": (lambda s: auto.encode(s), lambda ids: auto.decode(ids)),
        "tiktoken": (lambda s: enc.encode(s, allowed_special="all"), enc.decode),
    }


def assert_same_ids(exported, texts):
    tok, libraries = exported
    for text in texts:
        ids = tok.encode(text)
        for library, (encode, decode) in libraries.items():
            assert encode(text) == ids, (library, text[:200])
            assert decode(ids) == text, (library, text[:200])


# ---------------------------------------------------------------------------------------------------------------------
# Ids and decoding: our Tokenizer vs tokenizers, AutoTokenizer and tiktoken
# ---------------------------------------------------------------------------------------------------------------------

def test_exported_tokenizers_match_on_special_tokens_and_parity_texts(exported):
    assert_same_ids(exported, PARITY_TEXTS + SPECIAL_TEXTS)


def test_exported_tokenizers_match_on_10000_random_unicode_strings(exported):
    """The strings of test_bpe.py's round-trip test (seed 1234, lengths 0..40)."""
    rng = random.Random(1234)
    assert_same_ids(exported, [random_unicode(rng, rng.randint(0, 40)) for _ in range(10_000)])


@pytest.mark.parametrize("name", ["kernel-docs-valid.txt", "tinyshakespeare.txt"])
def test_exported_tokenizers_match_on_shared_data(exported, shared_dir, name):
    path = shared_dir / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert_same_ids(exported, [path.read_text(encoding="utf-8")])


def test_the_printed_tiktoken_one_liner_works(tmp_path):
    """The line `bpe.py export --format tiktoken` prints (and the README shows) builds a working Encoding."""
    pytest.importorskip("tiktoken")
    tok = trained_tokenizer(tmp_path)
    tok.save_dir(tmp_path)
    out = subprocess.run([sys.executable, "bpe.py", "export", "--tokenizer", str(tmp_path), "--format", "tiktoken",
                          "--out", str(tmp_path / "t.tiktoken")], capture_output=True, text=True, check=True,
                         cwd=bpe.Path(bpe.__file__).parent).stdout
    line = out.splitlines()[-1].strip()
    assert line.startswith("import tiktoken")
    text = SPECIAL_TEXTS[0]
    got = subprocess.run([sys.executable, "-c", f"{line}; print(enc.encode({text!r}, allowed_special='all'))"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(got) == tok.encode(text)


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer.json back into a Tokenizer (train.py import), and what cannot be
# ---------------------------------------------------------------------------------------------------------------------

def test_tokenizer_json_reads_back_into_the_same_tokenizer(tmp_path):
    tok = trained_tokenizer(tmp_path)
    back = tokenizer_formats.tokenizer_from_hf_json(tokenizer_formats.hf_tokenizer_json(tok), "tokenizer.json")
    assert (back.vocab, back.merges, back.special_tokens) == (tok.vocab, tok.merges, tok.special_tokens)


def test_a_tokenizer_json_written_by_hugging_face_reads_back_with_the_same_ids(tmp_path):
    """GPT-2's layout as HF writes it (ByteLevel with its built-in regex, merges as "a b" strings, EOT in the vocab)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = trained_tokenizer(tmp_path)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(
        {bpe.token_to_str(t): i for i, t in tok.vocab.items() if i not in tok.special_token_ids.values()},
        [(bpe.token_to_str(a), bpe.token_to_str(b)) for a, b in tok.merges]))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([tokenizers.AddedToken(EOT, special=True, normalized=False)])
    obj = json.loads(hf.to_str())
    obj["model"]["merges"] = [" ".join(m) for m in obj["model"]["merges"]]  # the older file format
    back = tokenizer_formats.tokenizer_from_hf_json(obj, "tokenizer.json")
    rng = random.Random(3)
    for text in PARITY_TEXTS + [random_unicode(rng, 60) for _ in range(300)]:
        assert back.encode(text) == hf.encode(text).ids, text


def edit(path, value):
    """A function that sets obj[path[0]][path[1]]... = value in a tokenizer.json dict."""
    def apply(obj):
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return apply


NOT_GPT2_REGEX = {"type": "Split", "pattern": {"Regex": r"\s+|\S+"}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize("change, message", [
    (edit(["model", "type"], "Unigram"), r"the model is 'Unigram', not BPE"),
    (edit(["pre_tokenizer"], {"type": "Metaspace", "replacement": "▁"}), r"not a byte-level tokenizer \(pre-tokenizer "
                                                                         r"Metaspace"),
    (edit(["decoder"], {"type": "Fuse"}), r"not a byte-level tokenizer .*decoder Fuse"),
    (edit(["pre_tokenizer", "pretokenizers", 0], NOT_GPT2_REGEX), r"does not split by GPT-2's regex"),
    (edit(["pre_tokenizer", "pretokenizers", 1, "add_prefix_space"], True), r"add_prefix_space is true"),
    (edit(["normalizer"], {"type": "NFC"}), r"has a normalizer \(NFC\)"),
    (edit(["model", "ignore_merges"], True), r"sets ignore_merges=True"),
    (edit(["model", "byte_fallback"], True), r"sets byte_fallback=True"),
    (edit(["added_tokens", 0, "lstrip"], True), r"added token '<\|endoftext\|>' strips spaces"),
])
def test_tokenizer_json_that_encodes_differently_is_refused(tmp_path, change, message):
    obj = tokenizer_formats.hf_tokenizer_json(trained_tokenizer(tmp_path))
    change(obj)
    with pytest.raises(ValueError, match=r"^tokenizer\.json: .*" + message):
        tokenizer_formats.tokenizer_from_hf_json(obj, "tokenizer.json")


def test_a_special_token_hugging_face_would_decode_wrongly_is_refused():
    tok = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|é|>"])
    with pytest.raises(ValueError, match=r"special token '<\|é\|>' would decode wrongly in Hugging Face tokenizers"):
        tokenizer_formats.hf_tokenizer_json(tok)


def test_tiktoken_refuses_merge_orders_it_cannot_express():
    byte_vocab = {i: bytes([i]) for i in range(256)}
    out_of_order = bpe.Tokenizer({**byte_vocab, 256: b"ab", 257: b"bc"}, [(b"b", b"c"), (b"a", b"b")])
    with pytest.raises(ValueError, match=r"merge 1 \(a b\) makes token id 256, not above the previous merge's 257"):
        tokenizer_formats.tiktoken_ranks(out_of_order)
    stray = bpe.Tokenizer({**byte_vocab, 256: b"xyz"}, [])
    with pytest.raises(ValueError, match=r"token id 256 \(xyz\) is made by no merge"):
        tokenizer_formats.tiktoken_ranks(stray)


def test_bpe_export_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert bpe.main(["export", "--tokenizer", str(tmp_path / "none"), "--format", "hf", "--out", out]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as e:
        bpe.main(["export", "--tokenizer", str(tmp_path), "--format", "sentencepiece", "--out", out])
    assert e.value.code == 2 and "invalid choice: 'sentencepiece'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Models: train.py export -> transformers, transformers -> train.py import, and back
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tokenizer directory (the small trained tokenizer), as bpe.py train writes it."""
    d = tmp_path_factory.mktemp("tok")
    trained_tokenizer(d).save_dir(d)
    return d


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("safetensors")
    return pytest.importorskip("transformers")


SMALL = dict(context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def our_checkpoint(path, tok_dir, seed=0, **overrides) -> TransformerLM:
    """A randomly initialised TransformerLM over tok_dir's vocab, saved as a train.py checkpoint at `path`."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=bpe.Tokenizer.from_dir(tok_dir).vocab_size, **{**SMALL, **overrides})
    model = TransformerLM(**dataclasses.asdict(cfg)).eval()
    train.save_checkpoint(model, None, 0, path, tokenizer_dir=str(tok_dir))
    return model


def random_ids(vocab_size, shape=(3, 32), seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("rope_theta", [10_000.0, 500_000.0])
def test_exported_model_gives_our_logits_in_transformers(hf, tok_dir, tmp_path, tie_embeddings, rope_theta):
    ours = our_checkpoint(tmp_path / "ckpt.pt", tok_dir, tie_embeddings=tie_embeddings, rope_theta=rope_theta)
    assert train.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")]) == 0
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.tie_word_embeddings == tie_embeddings and theirs.config.num_key_value_heads == 4
    ids = random_ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_hf_greedy_generate_yields_the_ids_of_sample_generate(hf, tok_dir, tmp_path):
    ours = our_checkpoint(tmp_path / "ckpt.pt", tok_dir, seed=1)
    train.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    theirs = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = hf.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = tok("Hello, world", return_tensors="pt").input_ids  # (1, T)
    assert prompt[0].tolist() == bpe.Tokenizer.from_dir(tok_dir).encode("Hello, world")
    eos = tok.eos_token_id
    expected = sample.generate(ours, prompt[0].tolist(), 24, temperature=0, eos_id=eos).tolist()
    got = theirs.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=eos)[0, prompt.shape[1]:]
    assert got.tolist() == expected and len(expected) == 24, (got, expected)


def hf_llama(hf, vocab_size, seed=0, **overrides):
    """A randomly initialised transformers LlamaForCausalLM that model.py can represent (eps 1e-5, no GQA)."""
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5,
                  rope_theta=10_000.0, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    return hf.LlamaForCausalLM(hf.LlamaConfig(**{**config, **overrides})).eval()


def save_hf_dir(model, tok_dir, path, weights="safetensors"):
    """model.save_pretrained(path) plus our tokenizer as tokenizer.json; weights "bin" replaces model.safetensors
    by pytorch_model.bin, "shards" saves several safetensors files and their index."""
    model.save_pretrained(path, max_shard_size="20KB" if weights == "shards" else "50GB")
    if weights == "bin":
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer_formats.save_hf_tokenizer(bpe.Tokenizer.from_dir(tok_dir), path)
    return path


@pytest.mark.parametrize("weights, overrides", [("safetensors", {}), ("bin", {}), ("shards", {}),
                                                ("safetensors", {"tie_word_embeddings": True}),
                                                ("safetensors", {"rope_theta": 500_000.0}),
                                                ("bfloat16", {})])
def test_imported_hf_llama_gives_its_logits(hf, tok_dir, tmp_path, weights, overrides):
    theirs = hf_llama(hf, 700, **overrides)
    if weights == "bfloat16":  # the Hub's usual dtype; it converts to fp32 exactly
        theirs = theirs.to(torch.bfloat16)
    save_hf_dir(theirs, tok_dir, tmp_path / "hf", weights)
    if weights == "shards":
        assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert train.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    ours, tok, _ = sample.load_model(tmp_path / "run" / "last.pt")
    assert tok.vocab == bpe.Tokenizer.from_dir(tok_dir).vocab
    ids = random_ids(700)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs.float()(ids).logits, atol=1e-4, rtol=0)


def test_export_with_force_leaves_no_other_models_tokenizer_files(hf, tok_dir, tmp_path):
    """Issue 32's example: another model's special_tokens_map.json beside the export gave AutoTokenizer 3 tokens too
    many. Without --force such a directory is refused (tests/test_bad_input_interop.py); with it the file goes."""
    our_checkpoint(tmp_path / "ckpt.pt", tok_dir)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<a>", "<b>",
                                                                                                      "<c>"]}))
    assert train.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert len(hf.AutoTokenizer.from_pretrained(tmp_path / "hf")) == bpe.Tokenizer.from_dir(tok_dir).vocab_size


def test_export_import_export_round_trips_bit_for_bit(hf, tok_dir, tmp_path):
    ours = our_checkpoint(tmp_path / "ckpt.pt", tok_dir, tie_embeddings=True)
    assert train.main(["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf1")]) == 0
    assert train.main(["import", str(tmp_path / "hf1"), "--out", str(tmp_path / "run")]) == 0
    assert train.main(["export", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "hf2")]) == 0
    files = sorted(p.name for p in (tmp_path / "hf1").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert files == sorted(p.name for p in (tmp_path / "hf2").iterdir())
    for name in files:
        assert (tmp_path / "hf1" / name).read_bytes() == (tmp_path / "hf2" / name).read_bytes(), name
    imported = lib.checkpoints.read_checkpoint(tmp_path / "run" / "last.pt")
    assert imported["model_config"] == dataclasses.asdict(ours.config)
    for key, value in ours.state_dict().items():
        assert torch.equal(imported["model"][key], value), key


def test_an_imported_run_samples_and_evaluates_with_sample_py(hf, tok_dir, tmp_path, capsys):
    save_hf_dir(hf_llama(hf, 700), tok_dir, tmp_path / "hf")
    train.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "last.pt")
    sample.main([ckpt, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"])
    assert "5 new tokens" in capsys.readouterr().out
    (tmp_path / "valid.txt").write_text(" ".join(PARITY_TEXTS) * 3, encoding="utf-8")
    sample.main([ckpt, "--eval", str(tmp_path / "valid.txt"), "--device", "cpu"])
    assert "perplexity" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------------
# What cannot be converted: one line each, exit code 2
# ---------------------------------------------------------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    """Run train.py with argv; it must exit 2 with one line on stderr, which is returned."""
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
    return err


@pytest.mark.parametrize("overrides, message", [
    ({"norm": "post"}, "cannot export norm='post': Hugging Face Llama always has pre-norm RMSNorm"),
    ({"norm": "none"}, "cannot export norm='none'"),
    ({"position": "nope"}, "cannot export position='nope': Hugging Face Llama always has RoPE"),
    ({"ffn": "silu", "d_ff": 128}, "cannot export ffn='silu': Hugging Face Llama always has the gated SwiGLU FFN"),
])
def test_export_refuses_ablations_hf_llama_cannot_express(tok_dir, tmp_path, capsys, overrides, message):
    our_checkpoint(tmp_path / "ckpt.pt", tok_dir, **overrides)
    assert message in one_line_error(capsys, ["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_export_without_a_tokenizer_or_safetensors_says_what_to_do(tok_dir, tmp_path, capsys, monkeypatch):
    model = our_checkpoint(tmp_path / "ckpt.pt", tok_dir)
    train.save_checkpoint(model, None, 0, tmp_path / "bare.pt")
    argv = ["export", str(tmp_path / "bare.pt"), "--out", str(tmp_path / "hf")]
    assert "names no tokenizer_dir: pass --tokenizer DIR" in one_line_error(capsys, argv)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if the package were not installed
    argv = ["export", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "hf")]
    assert "writing model.safetensors needs the safetensors package: pip install safetensors" in one_line_error(
        capsys, argv)


def set_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("changes, message", [
    ({"num_key_value_heads": 2}, "grouped-query attention (num_key_value_heads 2 < num_attention_heads 4): model.py's "
                                 "attention has one key/value head per query head"),
    ({"attention_bias": True}, "attention_bias is true: model.py's Linear layers have no biases"),
    ({"mlp_bias": True}, "mlp_bias is true: model.py's Linear layers have no biases"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "rope scaling 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
    ({"head_dim": 16}, "head_dim 16 is not hidden_size / num_attention_heads = 8"),
    ({"rms_norm_eps": 1e-6}, "rms_norm_eps 1e-06 differs from model.py's RMSNorm eps 1e-05"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not 'llama'"),
])
def test_import_refuses_configs_model_py_cannot_represent(hf, tok_dir, tmp_path, capsys, changes, message):
    src = save_hf_dir(hf_llama(hf, 700), tok_dir, tmp_path / "hf")
    set_json(src / "config.json", **changes)
    assert f"{src / 'config.json'}: {message}" in one_line_error(capsys, ["import", str(src), "--out",
                                                                          str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_import_refuses_non_byte_level_tokenizers_and_biases(hf, tok_dir, tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    src = save_hf_dir(hf_llama(hf, 700), tok_dir, tmp_path / "hf")
    argv = ["import", str(src), "--out", str(tmp_path / "run")]
    tokenizer_json = (src / "tokenizer.json").read_text()
    set_json(src / "tokenizer.json", pre_tokenizer={"type": "Metaspace", "replacement": "▁"})
    assert "tokenizer.json: not a byte-level tokenizer (pre-tokenizer Metaspace" in one_line_error(capsys, argv)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(b"sentencepiece")
    assert "has a SentencePiece tokenizer.model: only a byte-level BPE tokenizer.json can be imported" in (
        one_line_error(capsys, argv))
    (src / "tokenizer.json").write_text(tokenizer_json)
    tensors = safetensors_torch.load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    safetensors_torch.save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.self_attn.q_proj.bias is a bias (1 bias tensors)" in one_line_error(capsys, argv)
    del tensors["model.layers.0.self_attn.q_proj.bias"], tensors["model.norm.weight"]
    safetensors_torch.save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert "tensor 'model.norm.weight' is missing" in one_line_error(capsys, argv)
    (src / "model.safetensors").unlink()
    assert "has no model.safetensors or pytorch_model.bin" in one_line_error(capsys, argv)
    assert "config.json does not exist" in one_line_error(capsys, ["import", str(tmp_path), "--out", str(tmp_path)])
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --init-from: a new run from a checkpoint's weights (fine-tuning an imported model)
# ---------------------------------------------------------------------------------------------------------------------

RUN = ["--batch-size", "4", "--max-iters", "10", "--eval-interval", "5", "--eval-iters", "2", "--log-interval", "5",
       "--warmup-iters", "2", "--peak-flops", "0", "--device", "cpu"]
SHAPE = ["--context-length", "32", "--d-model", "32", "--num-layers", "2", "--num-heads", "4", "--d-ff", "48"]


def encoded_data(tmp_path, tok_dir, name="data", tokenizer_beside=True):
    """train.npy / valid.npy of random text encoded with tok_dir's tokenizer (and that tokenizer beside them)."""
    d = tmp_path / name
    d.mkdir()
    tok = bpe.Tokenizer.from_dir(tok_dir)
    rng = random.Random(5)
    for split, words in (("train", 3000), ("valid", 600)):
        (d / f"{split}.txt").write_text(random_text(rng, words, alphabet="abcdefghij", specials=[EOT]))
        datasets.encode_file(tok, d / f"{split}.txt", d / f"{split}.npy", num_workers=1)
    if tokenizer_beside:
        tok.save_dir(d)
    return d


def log_rows(run_dir):
    return lib.runs.read_log(run_dir / "log.jsonl")


def test_init_from_starts_a_new_run_from_the_weights(tok_dir, tmp_path, capsys):
    data = encoded_data(tmp_path, tok_dir)
    first, second = tmp_path / "first", tmp_path / "second"
    assert train.main(["--data", str(data), "--out", str(first), *SHAPE, *RUN]) == 0
    assert train.main(["--data", str(data), "--out", str(second), "--init-from", str(first / "last.pt"), *RUN]) == 0
    # Step 0 of the new run evaluates exactly the weights the first run ended with, on the same fixed windows.
    assert log_rows(second)[0]["step"] == 0
    assert log_rows(second)[0]["val_loss"] == log_rows(first)[-1]["val_loss"]
    # A fresh optimizer, schedule and step counter: 10 steps, not 20, and AdamW's own step count 10.
    ckpt = lib.checkpoints.read_checkpoint(second / "last.pt")
    assert ckpt["iteration"] == 10 and [r["step"] for r in log_rows(second)] == [0, 5, 10]
    assert all(state["step"] == 10 for state in ckpt["optimizer"]["state"].values())
    assert ckpt["train_args"]["init_from"] == str(first / "last.pt")
    assert ckpt["tokenizer_dir"] == str(data.resolve())


def test_an_imported_model_fine_tunes_with_init_from(hf, tok_dir, tmp_path, capsys):
    save_hf_dir(hf_llama(hf, 700), tok_dir, tmp_path / "hf")
    train.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    data = encoded_data(tmp_path, tmp_path / "imported", tokenizer_beside=False)
    argv = ["--data", str(data / "train.npy"), "--val-data", str(data / "valid.npy"), "--out", str(tmp_path / "tuned"),
            "--init-from", str(tmp_path / "imported" / "last.pt"), *RUN]
    assert train.main(argv) == 0
    rows = log_rows(tmp_path / "tuned")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    ckpt = lib.checkpoints.read_checkpoint(tmp_path / "tuned" / "last.pt")
    assert ckpt["tokenizer_dir"] == str((tmp_path / "imported").resolve())  # the model's tokenizer, for sample.py


def test_init_from_refusals_are_one_line(tok_dir, tmp_path, capsys):
    data = encoded_data(tmp_path, tok_dir)
    first = tmp_path / "first"
    train.main(["--data", str(data), "--out", str(first), *SHAPE, *RUN])
    init = ["--data", str(data), "--out", str(tmp_path / "new"), "--init-from", str(first / "last.pt"), *RUN]
    err = one_line_error(capsys, [*init, "--d-model", "64"])
    assert f"checkpoint {first / 'last.pt'} has a different model config (d_model 32 vs 64)" in err
    assert "a run from --init-from has that checkpoint's model: drop the model flags" in err
    assert "--init-from starts a new run and --resume continues one" in one_line_error(
        capsys, ["--resume", str(first), "--init-from", str(first / "last.pt")])
    other = tmp_path / "other-tok"
    other.mkdir()
    bpe.Tokenizer(*bpe.train_bpe(data / "train.txt", 700, [EOT], num_workers=1), [EOT]).save_dir(other)
    elsewhere = encoded_data(tmp_path, other, name="elsewhere")
    err = one_line_error(capsys, ["--data", str(elsewhere), "--out", str(tmp_path / "new"), "--init-from",
                                  str(first / "last.pt"), *RUN])
    assert f"the data directory {elsewhere} holds tokenizer " in err  # the tokenizers' fingerprints: their own test
    assert f"was trained with tokenizer " in err and f"from {data.resolve()}): point --data at data encoded" in err
    missing = ["--data", str(data), "--out", str(tmp_path / "new"), "--init-from", str(tmp_path / "none.pt"), *RUN]
    assert f"checkpoint {tmp_path / 'none.pt'} does not exist" in one_line_error(capsys, missing)
    assert not (tmp_path / "new").exists()


def test_resuming_an_imported_checkpoint_points_to_init_from(hf, tok_dir, tmp_path, capsys):
    save_hf_dir(hf_llama(hf, 700), tok_dir, tmp_path / "hf")
    train.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    err = one_line_error(capsys, ["--resume", str(tmp_path / "imported")])
    assert "holds weights but no training state; start a new run from it with --init-from " in err


# ---------------------------------------------------------------------------------------------------------------------
# --wandb: the log's rows and the config, to Weights & Biases (offline here)
# ---------------------------------------------------------------------------------------------------------------------

def test_wandb_gets_the_rows_of_log_jsonl_and_the_config(tok_dir, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(name, value)
    runs, logged = [], []
    real_init = wandb.init

    def init(**kwargs):  # the real wandb.init (offline); its run's log calls are recorded on the way through
        run = real_init(**kwargs)
        real_log = run.log

        def log(row, step):
            logged.append((step, dict(row)))
            real_log(row, step=step)

        monkeypatch.setattr(run, "log", log)
        runs.append(run)
        return run

    monkeypatch.setattr(wandb, "init", init)
    data, out = encoded_data(tmp_path, tok_dir), tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), *SHAPE, *RUN, "--wandb", "cs336", "--wandb-run", "tiny"]
    assert train.main(argv) == 0
    (run,) = runs
    assert (run.project, run.name) == ("cs336", "tiny")
    assert dict(run.config) == json.loads((out / "config.json").read_text())
    assert logged == [(row["step"], row) for row in log_rows(out)]
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))  # the offline run `wandb sync` would upload


def test_wandb_flags_without_the_package_or_project_are_one_line(tok_dir, tmp_path, capsys, monkeypatch):
    data = encoded_data(tmp_path, tok_dir)
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), *SHAPE, *RUN]
    assert "--wandb-run names a run of --wandb PROJECT: give --wandb too" in one_line_error(
        capsys, [*argv, "--wandb-run", "x"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the package were not installed
    assert "--wandb needs the wandb package: pip install wandb" in one_line_error(capsys, [*argv, "--wandb", "p"])
    assert not (tmp_path / "run").exists()
