"""Tests of the ecosystem formats, against the real libraries (dev dependencies; each test skips when its library is
missing): tokenizers exported as Hugging Face tokenizer.json (read by `tokenizers.Tokenizer.from_file` and
transformers' AutoTokenizer) and as a .tiktoken file (read by `tiktoken.Encoding`) give the ids of
`bpe.Tokenizer.encode` and decode back, on texts with special tokens, 10,000 seeded random Unicode strings and, when
../shared is present, kernel-docs-valid and tinyshakespeare; a tokenizer.json reads back into the same Tokenizer; and
every tokenizer.json or merge order that cannot be reproduced is refused with a message that names it.

    python -m pytest tests/test_hf.py      # ~1 min on 2 cores, most of it importing transformers
"""
import json
import random
import subprocess
import sys

import pytest

import bpe
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
    back = bpe.tokenizer_from_hf_json(bpe.hf_tokenizer_json(tok), "tokenizer.json")
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
    back = bpe.tokenizer_from_hf_json(obj, "tokenizer.json")
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
    obj = bpe.hf_tokenizer_json(trained_tokenizer(tmp_path))
    change(obj)
    with pytest.raises(ValueError, match=r"^tokenizer\.json: .*" + message):
        bpe.tokenizer_from_hf_json(obj, "tokenizer.json")


def test_a_special_token_hugging_face_would_decode_wrongly_is_refused():
    tok = bpe.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|é|>"])
    with pytest.raises(ValueError, match=r"special token '<\|é\|>' would decode wrongly in Hugging Face tokenizers"):
        bpe.hf_tokenizer_json(tok)


def test_tiktoken_refuses_merge_orders_it_cannot_express():
    byte_vocab = {i: bytes([i]) for i in range(256)}
    out_of_order = bpe.Tokenizer({**byte_vocab, 256: b"ab", 257: b"bc"}, [(b"b", b"c"), (b"a", b"b")])
    with pytest.raises(ValueError, match=r"merge 1 \(a b\) makes token id 256, not above the previous merge's 257"):
        bpe.tiktoken_ranks(out_of_order)
    stray = bpe.Tokenizer({**byte_vocab, 256: b"xyz"}, [])
    with pytest.raises(ValueError, match=r"token id 256 \(xyz\) is made by no merge"):
        bpe.tiktoken_ranks(stray)


def test_bpe_export_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert bpe.main(["export", "--tokenizer", str(tmp_path / "none"), "--format", "hf", "--out", out]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as e:
        bpe.main(["export", "--tokenizer", str(tmp_path), "--format", "sentencepiece", "--out", out])
    assert e.value.code == 2 and "invalid choice: 'sentencepiece'" in capsys.readouterr().err
