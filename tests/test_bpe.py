"""Tests of bpe.py, the chapter: the three trainers agree (the teaching version train_bpe_naive, the readable
incremental trainer that train_bpe runs, and lib/fast_bpe.py's with 1 and 2 workers) on corpora with ties, special
tokens, Unicode, empty documents and the handout's example; the readable trainer passes the official CS336 speed test
(vocab 500 in under 1.5 s); the tokenizer's plain encode equals the fast one and tiktoken (our trained vocab, and
GPT-2's from ../shared/fixtures, skipped when that is absent); 10,000 random Unicode round-trips; encode_iterable
equals encode; vocab.json/merges.txt round-trips; and bad inputs (missing, empty or non-UTF-8 files, bad vocab sizes
and special tokens, malformed tokenizer files), each an error that names the problem. The fast trainer's and encoder's
own machinery is tested in test_fast_bpe.py, encode_file in test_datasets.py.

Run: python -m pytest tests/test_bpe.py (~15 s on 2 cores). This file has no slow tests; `python -m pytest -m slow`
runs the project's slow end-to-end checks, which the default run skips.
"""
import json
import random
import time
from collections import Counter

import pytest
import regex

import bpe
from lib import fast_bpe

EOT = "<|endoftext|>"


def write(tmp_path, text, name="corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def random_text(rng: random.Random, n_words: int, alphabet="abcde", specials=()) -> str:
    """Words over a small alphabet (many equal pair counts, so ties matter), mixed whitespace and punctuation."""
    seps = [" ", " ", " ", "\n", "\n\n", "  ", "\t", ", ", ". ", "'s ", " 12 ", " \n "]
    out = []
    for _ in range(n_words):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
        out.append(rng.choice(seps))
        if specials and rng.random() < 0.05:
            out.append(rng.choice(specials))
    return "".join(out)


def random_unicode(rng: random.Random, length: int) -> str:
    """Mixed scripts, emoji, combining marks, every kind of whitespace (incl. U+001C..U+001F and NBSP), digits."""
    pools = ["abcxyz ABC", "0123456789", " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2000\u3000", "'s've're.,!?()[]{}",
             "éüßñçøå", "日本語中文字", "한국어", "🎉🙂👍🏽", "\u0301\u0308", "Ωλπ", "кириллица"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(length))


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def test_handout_example(tmp_path):
    """Sennrich et al.'s example from the handout section 2.4 (ties: 's t' over 'e s' etc.)."""
    path = write(tmp_path, "low low low low low lower lower widest widest widest newest newest newest newest newest newest")
    expected = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e")]
    for fast in (None, False, True):
        vocab, merges = (bpe.train_bpe_naive(path, 256 + 6) if fast is None else
                         bpe.train_bpe(path, 256 + 6, fast=fast, num_workers=1))
        assert merges == expected
        assert vocab[256] == b"st" and vocab[261] == b"ne"


CORPORA = {
    "ties": "ab ab ba ba cd cd dc dc ef fe " * 3,
    "specials_and_empty_docs": f"{EOT}{EOT}hello world{EOT}{EOT}{EOT}hello there world{EOT}",
    "unicode": "héllo wörld 日本語 日本 🎉🎉 naïve café crème brûlée ÅÅÅ Ωμέγα 한국어 " * 4,
    "whitespace": "a  b\n\n\nc \n d\t\te   \n\n  f" * 5,
    # pairs of a token with itself and overlapping occurrences ("a b a b", "a a a"): the merge loop's special cases
    "repeats": "aaaa aaa abab ababab abababa ---------- ==== xyxyxy aaaaaaaaa bababab " * 3,
    "no_pairs": f"a{EOT}b{EOT}{EOT}c",  # single-byte words only: no merge at all
}


def all_trainers(path, vocab_size, specials) -> list:
    """(vocab, merges) of each trainer: naive, readable incremental (the default), fast with 1 and 2 workers."""
    return [bpe.train_bpe_naive(path, vocab_size, specials), bpe.train_bpe(path, vocab_size, specials),
            bpe.train_bpe(path, vocab_size, specials, fast=True, num_workers=1),
            bpe.train_bpe(path, vocab_size, specials, fast=True, num_workers=2)]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_naive_readable_and_fast_trainers_agree(tmp_path, name):
    path = write(tmp_path, CORPORA[name])
    specials = [EOT] if EOT in CORPORA[name] else []
    naive, *others = all_trainers(path, 256 + len(specials) + 40, specials)
    for result in others:
        assert result == naive


@pytest.mark.parametrize("seed", range(2))
def test_naive_readable_and_fast_trainers_agree_random(tmp_path, seed):
    rng = random.Random(seed)
    path = write(tmp_path, random_text(rng, 1500, alphabet="abcdeé日", specials=[EOT]))
    naive, *others = all_trainers(path, 256 + 1 + 120, [EOT])
    assert len(naive[1]) == 120 and naive[0][256 + 120] == EOT.encode()
    for result in others:
        assert result[1] == naive[1] and result[0] == naive[0]


def test_incremental_bookkeeping_pieces():
    """The readable trainer's small functions, on their docstring examples: pairs of a word, the corpus's pair counts
    and word sets, the heap entry's order (count, then the greater pair), and one merge's update."""
    assert bpe.word_pairs((1, 2, 1, 2)) == Counter({(1, 2): 2, (2, 1): 1})
    counts, words = bpe.count_pairs([(1, 2, 1), (2, 1)], [3, 1])
    assert counts == {(1, 2): 3, (2, 1): 4} and words == {(1, 2): {0}, (2, 1): {0, 1}}
    vocab = [bytes([i]) for i in range(256)] + [b"ab"]
    entries = [bpe.heap_entry(3, (97, 98), vocab), bpe.heap_entry(5, (97, 98), vocab), bpe.heap_entry(3, (98, 97), vocab),
               bpe.heap_entry(3, (97, 256), vocab)]
    assert [e[2] for e in sorted(entries)] == [(97, 98), (98, 97), (97, 98), (97, 256)]
    words, freqs = [(1, 2, 3)], [2]
    counts, where = bpe.count_pairs(words, freqs)
    assert bpe.apply_merge((1, 2), 9, words, freqs, counts, where) == {(9, 3)}
    assert words == [(9, 3)] and counts == {(9, 3): 2} and where == {(9, 3): {0}}
    assert bpe.bpe_merges(Counter({"ab": 2, "abc": 1}), 2) == [(b"a", b"b"), (b"ab", b"c")]


def english_like_text(n_bytes: int, seed: int = 0) -> str:
    """Seeded English-like text: Zipf-distributed words from a small vocabulary of English words and made-up ones,
    punctuation, line and paragraph breaks, <|endoftext|> between documents (a stand-in for the handout's corpus.en)."""
    rng = random.Random(seed)
    common = ("the of and to a in is it you that he was for on are with as I his they be at one have this from or "
              "had by word but what some we can out other were all there when up use your how said an each she which "
              "do their time if will way about many then them write would like so these her long make thing see him "
              "two has look more day could go come did number sound no most people my over know water than call first "
              "who may down side been now find any new work part take get place made live where after back little only "
              "round man year came show every good me give our under name very through just form sentence great think "
              "say help low line differ turn cause much mean before move right boy old too same tell does set three "
              "want air well also play small end put home read hand port large spell add even land here must big high "
              "such follow act why ask men change went light kind off need house picture try us again animal point "
              "mother world near build self earth father head stand own page should country found answer school grow "
              "study still learn plant cover food sun four between state keep eye never last let thought city tree "
              "cross farm hard start might story saw far sea draw left late run don't while press close night real "
              "life few north open seem together next white children begin got walk example ease paper group always "
              "music those both mark often letter until mile river car feet care second book carry took science eat "
              "room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main "
              "enough plain girl usual young ready above ever red list though feel talk bird soon body dog family "
              "direct pose leave song measure door product black short numeral class wind question happen complete "
              "ship area half rock order fire south problem piece told knew pass since top whole king space heard "
              "best hour better true during hundred five remember step early hold west ground interest reach fast "
              "verb sing listen six table travel less morning ten simple several vowel toward war lay against "
              "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice "
              "unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field "
              "rest correct able pound done beauty drive stood contain front teach week final gave green oh quick "
              "develop ocean warm free minute strong special mind behind clear tail produce fact street inch").split()
    syllables = ["ka", "lo", "mi", "ren", "tas", "vor", "el", "qui", "dan", "sor", "bel", "ith", "um", "zar"]
    rare = ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(3000)]
    words = common + rare
    weights = [1 / (k + 1) for k in range(len(words))]  # Zipf: the k-th word ~ 1/k
    out, size = [], 0
    while size < n_bytes:
        doc = rng.choices(words, weights, k=rng.randint(50, 400))
        sentences, i = [], 0
        while i < len(doc):
            n = rng.randint(5, 20)
            s = " ".join(doc[i:i + n])
            sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ",", ";"]))
            i += n
        text = " ".join(sentences).replace(" ,", ",") + rng.choice(["\n", "\n\n"])
        out.append(text + EOT + "\n")
        size += len(text) + len(EOT) + 1
    return "".join(out)


def test_train_bpe_speed(tmp_path):
    """The official CS336 speed test's bound (tests/test_train_bpe.py: vocab 500 on corpus.en, < 1.5 s), on ~300 KB
    of English-like text built here: the readable incremental trainer, train_bpe's default, passes it."""
    path = write(tmp_path, english_like_text(300_000))
    assert path.stat().st_size > 250_000
    t0 = time.perf_counter()
    vocab, merges = bpe.train_bpe(path, 500, [EOT])
    elapsed = time.perf_counter() - t0
    assert len(merges) == 500 - 256 - 1 and vocab[499] == EOT.encode()
    assert elapsed < 1.5, f"train_bpe took {elapsed:.2f} s"


def test_pretokens_and_special_tokens():
    """count_pretokens: the GPT-2 regex between special tokens, which are never counted; split_on_specials keeps them
    whole (longest match first)."""
    assert bpe.count_pretokens("low low<|e|>lower", ["<|e|>"]) == Counter({"low": 1, " low": 1, "lower": 1})
    assert bpe.count_pretokens("it's  42!") == Counter(["it", "'s", " ", " 42", "!"])
    pattern = bpe.special_pattern([EOT, EOT + EOT])
    assert bpe.split_on_specials(f"a{EOT}{EOT}b{EOT}", pattern) == ["a", EOT + EOT, "b", EOT, ""]
    assert bpe.split_on_specials("ab", None) == ["ab"]


def test_stops_early_with_a_note(tmp_path, capsys):
    path = write(tmp_path, "ab ab")
    for fast in (False, True):
        vocab, merges = bpe.train_bpe(path, 1000, fast=fast, num_workers=1)
        assert merges == [(b"a", b"b"), (b" ", b"ab")]
        assert len(vocab) == 258
        assert "note:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Bad training input
# ---------------------------------------------------------------------------------------------------------------------

def test_training_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bpe.train_bpe(tmp_path / "missing.txt", 300)
    with pytest.raises(ValueError, match="empty"):
        bpe.train_bpe(write(tmp_path, "", "empty.txt"), 300)
    good = write(tmp_path, "hello world")
    with pytest.raises(ValueError, match="smaller than 256"):
        bpe.train_bpe(good, 256, [EOT])
    with pytest.raises(ValueError, match="empty string"):
        bpe.train_bpe(good, 300, [""])
    with pytest.raises(ValueError, match="too large"):  # the fast merge loop's token ids must fit in chr()
        bpe.train_bpe(good, fast_bpe.MAX_TRAIN_VOCAB + 2, [EOT], fast=True)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("hello wörld".encode("utf-8") + b" caf\xe9 ok")
    for fast in (False, True):
        with pytest.raises(ValueError, match=r"not valid UTF-8 at byte 16"):
            bpe.train_bpe(bad, 300, fast=fast)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: files, special tokens, parity with tiktoken
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small tokenizer trained on mixed text with many whitespace runs (so merges contain spaces and newlines)."""
    rng = random.Random(11)
    text = random_text(rng, 6000, alphabet="abcdefghij", specials=[EOT]) + "".join(
        random_unicode(rng, 80) + "\n\n    " for _ in range(100))
    path = write(tmp_path_factory.mktemp("trained"), text)
    vocab, merges = bpe.train_bpe(path, 700, [EOT], fast=True, num_workers=1)
    return vocab, merges


def tiktoken_encoding(vocab, special_ids):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {t: i for i, t in vocab.items() if i not in special_ids.values()}
    return tiktoken.Encoding(name="test", pat_str=bpe.GPT2_PAT, mergeable_ranks=ranks, special_tokens=special_ids)


PARITY_TEXTS = [
    "Hello, world! It's a test: don't they've we're I'll.",
    "  leading spaces\n\n\ntrailing   \n",
    f"doc one{EOT}doc two{EOT}{EOT}  spaced {EOT}",
    "日本語のテキスト、中文字符，한국어 텍스트 🎉👍🏽 naïve café\u00a0nbsp\u3000ideographic",
    "tabs\tand\x0bvertical\x0cfeeds\rreturns\x1cfile\x1dsep\x1e\x1f",
    "numbers 1234567890 3.14159 1,000,000 and symbols @#$%^&*()_+-=[]{}|;':\",./<>?",
    "combining e\u0301 a\u0308 and emoji sequences 👨‍👩‍👧 🇩🇪",
]


def test_tiktoken_parity_our_vocab(trained):
    """Plain encode == fast encode == tiktoken, on our trained vocab."""
    vocab, merges = trained
    tok, fast = bpe.Tokenizer(vocab, merges, [EOT]), bpe.Tokenizer(vocab, merges, [EOT], fast=True)
    enc = tiktoken_encoding(vocab, tok.special_token_ids)
    rng = random.Random(5)
    texts = PARITY_TEXTS + [random_unicode(rng, 300) for _ in range(200)]
    for text in texts:
        assert tok.encode(text) == fast.encode(text) == enc.encode(text, allowed_special="all"), text


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return bpe.Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


@pytest.fixture(scope="module")
def gpt2_fast(gpt2):
    return bpe.Tokenizer(gpt2.vocab, gpt2.merges, [EOT], fast=True)


def test_tiktoken_parity_gpt2(gpt2, gpt2_fast, gpt2_files):
    """Plain encode == fast encode == tiktoken, on GPT-2's vocab."""
    raw = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    vocab = {i: bpe.str_to_token(s, "gpt2") for s, i in raw.items()}
    enc = tiktoken_encoding(vocab, {EOT: raw[EOT]})
    assert gpt2.special_token_ids[EOT] == 50256 and gpt2.vocab_size == 50257 and gpt2_fast.vocab_size == 50257
    rng = random.Random(6)
    for text in PARITY_TEXTS + [random_unicode(rng, 300) for _ in range(200)]:
        assert gpt2.encode(text) == gpt2_fast.encode(text) == enc.encode(text, allowed_special="all"), text


def test_random_unicode_round_trip_and_fast_encode(gpt2, gpt2_fast):
    """10,000 seeded random strings: decode(encode(s)) == s, and the fast encode (chunk cache) equals the plain one."""
    rng = random.Random(1234)
    for k in range(10_000):
        s = random_unicode(rng, rng.randint(0, 40))
        ids = gpt2.encode(s)
        assert gpt2.decode(ids) == s
        if k % 10 == 0:
            assert ids == gpt2_fast.encode(s)


def replay_merges(tok: bpe.Tokenizer, pretoken: str) -> tuple:
    """The teaching definition of BPE encoding: apply every merge, in the order learned, to the pre-token's bytes."""
    ids_of = {t: i for i, t in tok.vocab.items()}
    word = tuple(pretoken.encode("utf-8"))
    word = tuple(ids_of[bytes([b])] for b in word)
    for a, b in tok.merges:
        word = bpe.merge_word(word, (ids_of[a], ids_of[b]), ids_of[a + b])
    return word


def test_bpe_by_rank_equals_replaying_the_merges(trained):
    """_bpe (lowest rank first) equals replaying the merge list, on random pre-tokens with repeats ("aaaa": every
    other pair of a run). The fast encoder's batched version is held to _bpe in test_fast_bpe.py."""
    tok = bpe.Tokenizer(*trained, [EOT])
    rng = random.Random(12)
    words = [m.group() for m in regex.finditer(bpe.GPT2_PAT, random_unicode(rng, 3000))]
    words += ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 12))) for _ in range(300)] + ["a" * 9, "é" * 7]
    for word in words[:400]:
        assert tok._bpe(word) == replay_merges(tok, word), word


@pytest.mark.parametrize("fast", [False, True])
def test_special_tokens_longest_match_and_appended(trained, fast):
    vocab, merges = trained
    double = EOT + EOT
    tok = bpe.Tokenizer(vocab, merges, [EOT, double], fast=fast)
    assert tok.special_token_ids[EOT] == 256 + len(merges)  # already in the vocab: keeps its id
    assert tok.special_token_ids[double] == len(vocab)  # absent: appended
    ids = tok.encode(f"a{double}b{EOT}c{EOT}{EOT}{EOT}")
    assert ids.count(tok.special_token_ids[double]) == 2 and ids.count(tok.special_token_ids[EOT]) == 2
    assert tok.decode(ids) == f"a{double}b{EOT}c{EOT}{EOT}{EOT}"
    assert tok.encode("<|endoftext") == bpe.Tokenizer(vocab, merges, fast=fast).encode("<|endoftext")  # a prefix is plain text


def test_decode_malformed_utf8(trained):
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges)
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"
    with pytest.raises(ValueError, match="not in the vocab"):
        tok.decode([10**6])


def test_save_load_round_trip(tmp_path, trained):
    vocab, merges = trained
    assert any(b" " in a + b or b"\n" in a + b for a, b in merges)  # the case a naive "a b" writer would break
    bpe.save_tokenizer(vocab, merges, tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert bpe.load_tokenizer_files(tmp_path / "vocab.json", tmp_path / "merges.txt") == (vocab, merges)
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    (tmp_path / "dir").mkdir()
    tok.save_dir(tmp_path / "dir")
    again = bpe.Tokenizer.from_dir(tmp_path / "dir")
    assert again.special_tokens == [EOT] and again.vocab == tok.vocab and again.merges == tok.merges


def test_gpt2_files_load(gpt2, gpt2_fast):
    for tok in (gpt2, gpt2_fast):
        assert tok.decode(tok.encode("Hello world")) == "Hello world"
        assert tok.encode("Hello world") == [15496, 995]  # ids from OpenAI's encoder.json


def test_bad_tokenizer_files(tmp_path, trained):
    vocab, merges = trained
    v, m = tmp_path / "vocab.json", tmp_path / "merges.txt"
    bpe.save_tokenizer(vocab, merges, v, m)
    good_merges = m.read_text(encoding="utf-8")
    v.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        bpe.load_tokenizer_files(v, m)
    bpe.save_tokenizer(vocab, merges, v, m)
    m.write_text(good_merges + "a b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected two tokens"):
        bpe.load_tokenizer_files(v, m)
    m.write_text(good_merges + "zzzz qqqq\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in .*vocab.json; the two files do not belong together"):
        bpe.load_tokenizer_files(v, m)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        bpe.Tokenizer.from_dir(tmp_path / "nowhere")
    bpe.save_tokenizer(vocab, merges, v, m)
    (tmp_path / "special_tokens.json").write_text('["<|endoftext|>"', encoding="utf-8")
    with pytest.raises(ValueError, match="special_tokens.json is not valid JSON"):
        bpe.Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("fast", [False, True])
def test_pickle_keeps_the_fast_switch(trained, fast):
    """A Tokenizer pickles (worker processes) as its arguments and its fast flag, not its caches."""
    import pickle
    tok = bpe.Tokenizer(*trained, [EOT], fast=fast)
    tok.encode("warm the caches")
    again = pickle.loads(pickle.dumps(tok))
    assert again.fast == fast and (again._encoder is None) == (not fast)
    assert (again.vocab, again.merges, again.special_tokens) == (tok.vocab, tok.merges, tok.special_tokens)
    assert again.encode(f"a b{EOT}c") == tok.encode(f"a b{EOT}c")


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True])
def test_encode_iterable_equals_encode(trained, fast):
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT, EOT + EOT], fast=fast)
    rng = random.Random(9)
    for _ in range(30):
        text = "".join(rng.choice([random_unicode(rng, 30), EOT, EOT + EOT, "  \n ", "<|endof"]) for _ in range(60))
        cuts = sorted(rng.sample(range(len(text)), 20))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert list(tok.encode_iterable(pieces, buffer_chars=rng.choice([1, 16, 64]))) == tok.encode(text)
