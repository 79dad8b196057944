"""Tests of bpe.py, the library: the fast trainer against the teaching trainer (ties, special tokens, Unicode, empty
documents, the handout's example, any number of workers and piece sizes, the rare-pair waiting list); the chunk regex's
whitespace set against regex's \\s on every code point; chunk counts to pre-token counts; the tokenizer against
tiktoken (our trained vocab, and GPT-2's from ../shared/fixtures, skipped when that is absent); 10,000 random Unicode
round-trips; the chunk cache against the plain path; encode_iterable (identical output, flat memory); encode_file (same
ids as encode, uint16 or uint32, no leftover files); vocab.json/merges.txt round-trips; and bad inputs (missing, empty
or non-UTF-8 files, bad vocab sizes and special tokens, malformed tokenizer files), each an error that names the
problem.

Run: python -m pytest tests/test_bpe.py (~15 s on 2 cores). This file has no slow tests; `python -m pytest -m slow`
runs the project's slow end-to-end checks, which the default run skips.
"""
import json
import random
import re
import tracemalloc

import numpy as np
import pytest
import regex

import bpe

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
    for train in (bpe.train_bpe_naive, bpe.train_bpe):
        vocab, merges = train(path, 256 + 6)
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


@pytest.fixture(params=["array phase only", "str words only", "switch after 7 merges"])
def merge_phases(request, monkeypatch):
    """The merge loop's two representations (bpe._FlatWords, then str words), each alone and with the switch between
    them part way through, whatever the words per merge: every test using this runs three times."""
    if request.param == "array phase only":
        monkeypatch.setattr(bpe._FlatWords, "MIN_WORDS", 0)
    elif request.param == "str words only":
        monkeypatch.setattr(bpe._FlatWords, "MIN_WORDS", float("inf"))
    else:
        calls = iter(range(10 ** 9))
        monkeypatch.setattr(bpe._FlatWords, "worth_it", lambda self, listed: next(calls) < 7)
    return request.param


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_fast_equals_naive_small(tmp_path, name, merge_phases):
    path = write(tmp_path, CORPORA[name])
    specials = [EOT] if EOT in CORPORA[name] else []
    naive = bpe.train_bpe_naive(path, 256 + len(specials) + 40, specials)
    fast = bpe.train_bpe(path, 256 + len(specials) + 40, specials, num_workers=1)
    assert fast == naive


@pytest.mark.parametrize("seed", range(3))
def test_fast_equals_naive_random(tmp_path, seed, merge_phases):
    rng = random.Random(seed)
    text = random_text(rng, 1500, alphabet="abcdeé日", specials=[EOT])
    path = write(tmp_path, text)
    naive = bpe.train_bpe_naive(path, 256 + 1 + 120, [EOT])
    fast = bpe.train_bpe(path, 256 + 1 + 120, [EOT], num_workers=1)
    assert fast[1] == naive[1]
    assert fast[0] == naive[0]
    assert len(fast[1]) == 120 and fast[0][256 + 120] == EOT.encode()


@pytest.mark.parametrize("seed", range(4))
def test_flat_words_merge_equals_rewrite_words(seed):
    """One merge on _FlatWords and with _rewrite_words: the same words after, the same counts of every neighbour and
    overlap, and word lists naming the same words (_FlatWords lists each once, _rewrite_words once per occurrence).
    Random words over few tokens (runs, overlaps, back-to-back pairs), with ids past 0xD800 (surrogate code points)
    and past 65,535 (the 32-bit sort) in some."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in (97, 98, 99, 0xD800 + seed, 70000)[:3 + seed % 3]]
    for _ in range(50):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(40)]
        freqs = [rng.randint(1, 5) for _ in words]
        pair, new = rng.choice(alphabet) + rng.choice(alphabet), chr(300 + seed)
        listed = sorted(i for i, w in enumerate(words) if pair in w or rng.random() < 0.2)  # and some stale ones
        if not listed:
            continue
        flat = bpe._FlatWords(words)
        got = flat.merge(np.array(listed, np.int32), pair, new, np.array(freqs, np.int64))
        expected_words = list(words)
        expected = bpe._rewrite_words(expected_words, freqs, listed, pair, new)
        assert flat.words() == expected_words
        assert (got.left_counts, got.right_counts, got.overlap) == (
            expected.left_counts, expected.right_counts, expected.overlap)
        for mine, theirs in ((got.left_words, expected.left_words), (got.right_words, expected.right_words)):
            assert {x: sorted(ids.tolist()) for x, ids in mine.items()} == {
                x: sorted(set(ids)) for x, ids in theirs.items()}


def test_concatenated_ranges_equals_the_aranges_joined():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 20))
        starts, sizes = rng.integers(0, 100, m), rng.integers(1, 6, m)
        expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, sizes)])
        assert bpe.concatenated_ranges(starts, sizes).tolist() == expected.tolist()
    assert bpe.concatenated_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0


def test_flat_words_phase_ends_on_a_lasting_drop_only():
    """worth_it averages the words per merge: one small merge among big ones keeps the array phase, a run of small
    ones ends it."""
    flat = bpe._FlatWords(["ab"])
    assert all(flat.worth_it(n) for n in [5000] * 20 + [3] + [5000] * 5)
    assert not all(flat.worth_it(3) for _ in range(1000))


def test_queue_entries_sort_as_count_then_greater_bytes():
    """A _PairQueue entry, one str, sorts as the tuple (-count, a's bytes reversed, b's bytes reversed): the higher
    count first, then the greater first byte string, then the greater second one, with prefixes (b"a" < b"ab") and the
    extreme bytes 0 and 255, and counts past 2^16 and 2^48 (the count key's digits)."""
    rng = random.Random(2)
    tokens = sorted({bytes(rng.choices([0, 1, 97, 98, 254, 255], k=rng.randint(1, 3))) for _ in range(60)})
    ids = {t: i for i, t in enumerate(tokens)}
    queue = bpe._PairQueue({}, [bpe._inverted(t) for t in tokens])
    cases = [(rng.choice([1, 2, 7, 65_535, 65_536, 2**48 + 3, 2**63]), rng.choice(tokens), rng.choice(tokens))
             for _ in range(3000)]
    by_entry = sorted(cases, key=lambda c: queue.entry(c[0], chr(ids[c[1]]) + chr(ids[c[2]])))
    by_rule = sorted(cases, key=lambda c: (-c[0], [-x for x in c[1]] + [1], [-x for x in c[2]] + [1]))
    assert by_entry == by_rule
    counts = [0, 1, 2**48 + 3, 2**63]
    assert [bpe._entry_count(queue.entry(n, "\x00\x01")) for n in counts] == counts


@pytest.mark.parametrize("rare", [0, 5, 1000])
def test_rare_pair_waiting_list_does_not_change_merges(tmp_path, monkeypatch, rare):
    """_PairQueue keeps pairs first seen at most RARE_PAIR_COUNT times out of the heap until the heap's top gets down
    to them: with none waiting (0), a flush two thirds of the way through the 300 merges (5) or at the second merge
    (1000), the merges are the teaching version's."""
    rng = random.Random(11)
    path = write(tmp_path, random_text(rng, 3000, alphabet="abcdefé", specials=[EOT]))
    naive = bpe.train_bpe_naive(path, 256 + 1 + 300, [EOT])
    monkeypatch.setattr(bpe, "RARE_PAIR_COUNT", rare)
    assert bpe.train_bpe(path, 256 + 1 + 300, [EOT], num_workers=1) == naive


def test_workers_and_pieces_do_not_change_the_result(tmp_path, monkeypatch):
    """Tiny pieces (many safe cuts, incl. next to overlapping special tokens) and 1 or 3 workers: same counts."""
    rng = random.Random(7)
    specials = [EOT, EOT + EOT]
    text = random_text(rng, 4000, alphabet="abcxyzé", specials=[EOT, EOT + EOT, EOT + " x"])
    path = write(tmp_path, text)
    expected = bpe.count_pretokens(text, specials)
    monkeypatch.setattr(bpe, "PIECE_BYTES", 97)
    assert len(bpe.find_piece_boundaries(path, 97, specials)) > 50
    for workers in (1, 3):
        assert bpe.count_pretokens_file(path, specials, workers) == expected
    # and without special tokens, where the only cuts are before whitespace
    assert bpe.count_pretokens_file(path, [], 3) == bpe.count_pretokens(text, [])
    assert bpe.train_bpe(path, 400, specials, num_workers=3) == bpe.train_bpe(path, 400, specials, num_workers=1)


def test_count_pretokens_matches_plain_regex():
    """The chunk-first counting (see CHUNK_RE) equals counting the GPT-2 regex matches directly."""
    rng = random.Random(3)
    for _ in range(200):
        text = random_unicode(rng, 200)
        assert bpe.count_pretokens(text) == bpe.Counter(regex.findall(bpe.GPT2_PAT, text))


def test_chunks_to_pretokens_groups_by_count():
    """chunks_to_pretokens pre-tokenises the chunks of equal frequency together (ASCII ones by the stdlib pattern):
    on ASCII-heavy text whose chunks occur once or many times, and with the non-joinable kinds (a text's first chunk,
    trailing whitespace), it equals counting the GPT-2 regex matches."""
    rng = random.Random(5)
    pools = ["abcXYZ", "0123", " \t\n\r\x0b\x0c\x1c\x1f", "'sdmtlvre", "!.,(){}-_", "é日"]
    texts = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    text = "".join(rng.choice(texts) for _ in range(500)) + "  \n"
    assert bpe.count_pretokens(text) == bpe.Counter(regex.findall(bpe.GPT2_PAT, text))
    chunk_counts = bpe.count_chunks(text)
    assert len(set(chunk_counts.values())) >= 5  # several groups
    assert bpe.chunks_to_pretokens(chunk_counts) == bpe.Counter(regex.findall(bpe.GPT2_PAT, text))


def test_chunk_whitespace_class_matches_regex_whitespace():
    """bpe.WHITESPACE, which CHUNK_RE's classes are built from, is exactly the GPT-2 pattern's \\s (regex) on every
    code point, and the class built from it (stdlib re) matches exactly those characters."""
    ws_re = re.compile(bpe._WS)
    ws_regex = regex.compile(r"\s")
    for cp in range(0x110000):
        c = chr(cp)
        assert bool(ws_re.match(c)) == bool(ws_regex.match(c)) == (c in bpe.WHITESPACE), hex(cp)


def test_pretokens_of_joined_chunks_match_one_by_one():
    """The lemma at work: the chunks' pre-tokens from joined regex calls (_pretokens_of_chunks: ASCII and other chunks
    apart, edge chunks alone) are those of the chunks one by one, and those of the whole text."""
    rng = random.Random(8)
    text = "".join(random_unicode(rng, 50) for _ in range(200))
    chunks = bpe.CHUNK_RE.findall(text)
    assert "".join(chunks) == text
    pretokens = bpe.Counter(bpe._pretokens_of_chunks(chunks))
    assert pretokens == bpe.Counter(p for c in chunks for p in regex.findall(bpe.GPT2_PAT, c))
    assert pretokens == bpe.Counter(regex.findall(bpe.GPT2_PAT, text))


def test_ascii_pretoken_regex_matches_gpt2_regex():
    """find_pretokens' stdlib pattern for ASCII text equals the GPT-2 pattern (regex) on every ASCII pair and triple
    of the interesting characters and on random ASCII text; non-ASCII text goes to the regex pattern."""
    special = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'sdmtlvre aZ09.!_"
    samples = [a + b for a in map(chr, range(128)) for b in map(chr, range(128))]
    samples += [a + b + c for a in special for b in special for c in special]
    rng = random.Random(11)
    samples += ["".join(rng.choice(special + "xyzQ5{}") for _ in range(60)) for _ in range(2000)]
    for text in samples:
        assert text.isascii() and bpe.ASCII_PRETOKEN_RE.findall(text) == regex.findall(bpe.GPT2_PAT, text), repr(text)
    mixed = "naïve  café's 42\u00a0x"
    assert bpe.find_pretokens(mixed) == regex.findall(bpe.GPT2_PAT, mixed) != bpe.ASCII_PRETOKEN_RE.findall(mixed)


def test_stops_early_with_a_note(tmp_path, capsys):
    path = write(tmp_path, "ab ab")
    vocab, merges = bpe.train_bpe(path, 1000)
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
    with pytest.raises(ValueError, match="too large"):  # token ids must fit in chr() for the merge loop
        bpe.train_bpe(good, bpe.MAX_TRAIN_VOCAB + 2, [EOT])
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("hello wörld".encode("utf-8") + b" caf\xe9 ok")
    with pytest.raises(ValueError, match=r"not valid UTF-8 at byte 16"):
        bpe.train_bpe(bad, 300)


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
    vocab, merges = bpe.train_bpe(path, 700, [EOT], num_workers=1)
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
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    enc = tiktoken_encoding(vocab, tok.special_token_ids)
    rng = random.Random(5)
    texts = PARITY_TEXTS + [random_unicode(rng, 300) for _ in range(200)]
    for text in texts:
        assert tok.encode(text) == enc.encode(text, allowed_special="all"), text


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return bpe.Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


def test_tiktoken_parity_gpt2(gpt2, gpt2_files):
    raw = json.loads(gpt2_files[0].read_text(encoding="utf-8"))
    vocab = {i: bpe.str_to_token(s, "gpt2") for s, i in raw.items()}
    enc = tiktoken_encoding(vocab, {EOT: raw[EOT]})
    assert gpt2.special_token_ids[EOT] == 50256 and gpt2.vocab_size == 50257
    rng = random.Random(6)
    for text in PARITY_TEXTS + [random_unicode(rng, 300) for _ in range(200)]:
        assert gpt2.encode(text) == enc.encode(text, allowed_special="all"), text


def test_random_unicode_round_trip_and_chunk_cache(gpt2):
    """10,000 seeded random strings: decode(encode(s)) == s, and the cached chunk path equals the plain path."""
    rng = random.Random(1234)
    for k in range(10_000):
        s = random_unicode(rng, rng.randint(0, 40))
        ids = gpt2.encode(s)
        assert gpt2.decode(ids) == s
        if k % 10 == 0:
            assert ids == gpt2.encode_plain(s)


def replay_merges(tok: bpe.Tokenizer, pretoken: str) -> tuple:
    """The teaching definition of BPE encoding: apply every merge, in the order learned, to the pre-token's bytes."""
    ids_of = {t: i for i, t in tok.vocab.items()}
    word = tuple(pretoken.encode("utf-8"))
    word = tuple(ids_of[bytes([b])] for b in word)
    for a, b in tok.merges:
        word = bpe.merge_word(word, (ids_of[a], ids_of[b]), ids_of[a + b])
    return word


def test_hash_table_equals_a_dict():
    """_HashTable (the batched BPE's merge lookup) gives what a dict gives, for keys in the table (many of them away
    from their home slot: 20,000 keys collide) and keys not in it, and for an empty table."""
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 10**12, 20_000))
    values = rng.integers(-10**12, 10**12, keys.size)
    table = bpe._HashTable(keys, values, missing=-7)
    assert ((table.keys != table.EMPTY).sum() == keys.size
            and (table._slot(table.keys[table.keys != table.EMPTY]) != np.flatnonzero(table.keys != table.EMPTY)).any())
    queries = np.concatenate([keys, rng.integers(0, 10**12, 5_000), keys[::-3]])
    reference = dict(zip(keys.tolist(), values.tolist()))
    assert table.get(queries).tolist() == [reference.get(k, -7) for k in queries.tolist()]
    assert bpe._HashTable(np.array([], np.int64), np.array([], np.int64), -1).get(np.array([0, 5])).tolist() == [-1, -1]


def test_bpe_by_rank_and_batched_equal_replaying_the_merges(trained, gpt2):
    """_bpe (lowest rank first) equals replaying the merge list; _bpe_batch (numpy, all words at once) equals _bpe,
    on random pre-tokens with repeats ("aaaa": every other pair of a run) and GPT-2's own tokens."""
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    rng = random.Random(12)
    words = [m.group() for m in regex.finditer(bpe.GPT2_PAT, random_unicode(rng, 3000))]
    words += ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 12))) for _ in range(300)] + ["a" * 9, "é" * 7]
    for word in words[:400]:
        assert tok._bpe(word) == replay_merges(tok, word), word
    assert tok._bpe_batch(words) == [tok._bpe(w) for w in words]
    gpt2_words = [t.decode("utf-8") for t in list(gpt2.vocab.values())[::7] if t.isascii()] + words
    assert gpt2._bpe_batch(gpt2_words) == [gpt2._bpe(w) for w in gpt2_words]
    assert all(len(ids) == 1 for ids in gpt2._bpe_batch(gpt2_words[:500]))  # GPT-2's tokens encode to themselves
    # ids past 65,535 (the packed merge keeps 32 bits of id): the same vocab, every id moved up by 70,000
    shifted = bpe.Tokenizer({i + 70_000: t for i, t in vocab.items()}, merges, [EOT])
    assert shifted._bpe_batch(words) == [tuple(i + 70_000 for i in ids) for ids in tok._bpe_batch(words)]


def test_batched_cold_path_equals_plain_path(trained, gpt2_files, monkeypatch):
    """The batched cold path (_cache_chunks: one regex call for many chunks, _bpe_batch) equals encode_plain, on long
    multi-document texts whose first and last chunks start without or end with whitespace, for any batch threshold."""
    vocab, merges = trained
    rng = random.Random(13)
    texts = [EOT.join(random_unicode(rng, rng.randint(0, 400)) for _ in range(30)) for _ in range(20)]
    texts += ["x" + EOT + "  y  " + EOT + "\n", "only-one-chunk", "   ", EOT, ""]
    for batch_min in (1, 64):
        monkeypatch.setattr(bpe.Tokenizer, "BATCH_MIN", batch_min)
        for tok in (bpe.Tokenizer(vocab, merges, [EOT]), bpe.Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])):
            for text in texts:
                assert tok.encode(text) == tok.encode_plain(text), text


def test_encode_assembles_from_a_warm_cache_and_fills_it_only_for_new_chunks(trained):
    """encode assembles the ids straight from the chunk cache and fills the cache only when a chunk is missing (the
    KeyError path): a fully cached text, and one whose chunks are cached up to a special token and new after it."""
    tok = bpe.Tokenizer(*trained, [EOT])
    seen = "the cat sat on the mat, twice"
    assert tok.encode(seen) == tok.encode_plain(seen)
    cached = dict(tok._chunk_cache)
    assert tok.encode(seen) == tok.encode_plain(seen) and tok._chunk_cache == cached  # warm: nothing added
    partly = seen + EOT + " a dog barked at the postman"
    assert tok.encode(partly) == tok.encode_plain(partly)
    added = set(tok._chunk_cache) - set(cached)
    assert added and all(chunk in partly.split(EOT)[1] for chunk in added)  # only the new text's chunks


def test_special_tokens_longest_match_and_appended(trained):
    vocab, merges = trained
    double = EOT + EOT
    tok = bpe.Tokenizer(vocab, merges, [EOT, double])
    assert tok.special_token_ids[EOT] == 256 + len(merges)  # already in the vocab: keeps its id
    assert tok.special_token_ids[double] == len(vocab)  # absent: appended
    ids = tok.encode(f"a{double}b{EOT}c{EOT}{EOT}{EOT}")
    assert ids.count(tok.special_token_ids[double]) == 2 and ids.count(tok.special_token_ids[EOT]) == 2
    assert tok.decode(ids) == f"a{double}b{EOT}c{EOT}{EOT}{EOT}"
    assert tok.encode("<|endoftext") == bpe.Tokenizer(vocab, merges).encode("<|endoftext")  # a prefix is plain text


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


def test_gpt2_files_load(gpt2):
    assert gpt2.decode(gpt2.encode("Hello world")) == "Hello world"
    assert gpt2.encode("Hello world") == [15496, 995]  # ids from OpenAI's encoder.json


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


# ---------------------------------------------------------------------------------------------------------------------
# Streaming and files
# ---------------------------------------------------------------------------------------------------------------------

def test_encode_iterable_equals_encode(trained):
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT, EOT + EOT])
    rng = random.Random(9)
    for _ in range(30):
        text = "".join(rng.choice([random_unicode(rng, 30), EOT, EOT + EOT, "  \n ", "<|endof"]) for _ in range(60))
        cuts = sorted(rng.sample(range(len(text)), 20))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        assert list(tok.encode_iterable(pieces, buffer_chars=rng.choice([1, 16, 64]))) == tok.encode(text)


def test_encode_iterable_memory_is_flat(trained):
    """Streaming ~4 MB peaks at about what ~1 MB does, far below the text size."""
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    rng = random.Random(2)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(["\n", f"{EOT}\n"]) for _ in range(997)]

    def peak(n_lines):
        tracemalloc.start()
        n = sum(1 for _ in tok.encode_iterable(lines[i % 997] for i in range(n_lines)))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return n, top

    peak(2000)  # warm the caches
    n1, p1 = peak(18_000)  # ~1 MB
    n4, p4 = peak(72_000)  # ~4 MB
    assert n4 > 3.5 * n1
    assert p4 < 1.5 * p1 + 200_000 and p4 < 1_600_000  # flat, and under 0.4x the text: one buffer's chunk lists


def test_encode_file_matches_encode(tmp_path, trained, monkeypatch):
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT])
    text = random_text(random.Random(4), 5000, alphabet="abcdefé", specials=[EOT])
    src = write(tmp_path, text)
    monkeypatch.setattr(bpe, "PIECE_BYTES", 1000)
    for workers in (1, 2):
        out = tmp_path / f"out{workers}.npy"
        n = bpe.encode_file(tok, src, out, num_workers=workers)
        arr = np.load(out, mmap_mode="r")
        assert arr.dtype == np.uint16 and n == len(arr)
        assert arr.tolist() == tok.encode(text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out1.npy", "out2.npy"]


def test_encode_file_uint32_for_big_vocab(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {i: b"tok%d" % i for i in range(256, 70_000)}
    tok = bpe.Tokenizer(vocab, [])
    bpe.encode_file(tok, write(tmp_path, "hi there"), tmp_path / "o.npy")
    arr = np.load(tmp_path / "o.npy")
    assert arr.dtype == np.uint32 and tok.decode(arr.tolist()) == "hi there"


def test_encode_file_bad_inputs(tmp_path, trained):
    tok = bpe.Tokenizer(*trained)
    with pytest.raises(FileNotFoundError, match="output directory"):
        bpe.encode_file(tok, write(tmp_path, "abc"), tmp_path / "no" / "o.npy")
    with pytest.raises(ValueError, match="empty"):
        bpe.encode_file(tok, write(tmp_path, "", "e.txt"), tmp_path / "o.npy")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 3"):
        bpe.encode_file(tok, bad, tmp_path / "o.npy")
    assert not any(p.name.startswith("o.npy") for p in tmp_path.iterdir())
