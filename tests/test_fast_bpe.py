"""Tests of lib/fast_bpe.py, bpe.py's fast path: the fast trainer against the teaching trainer in each phase of its
merge loop (the array phase, str words, the switch between them), its pieces (_FlatWords against _rewrite_words, the
queue's entry order, the untracked rare pairs, any number of workers and piece sizes); pre-tokenisation by chunks
against the plain GPT-2 regex (the chunk regex's whitespace set against regex's \\s on every code point, the ASCII
pattern); and the fast encoder against the plain one (the hash table, batched BPE, the cold path for any batch size,
the warm cache, flat memory while streaming).

Run: python -m pytest tests/test_fast_bpe.py (~20 s on 2 cores). This file has no slow tests.
"""
import random
import re
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import regex

import bpe
from lib import fast_bpe
from test_bpe import CORPORA, EOT, random_text, random_unicode, replay_merges, trained, write  # noqa: F401 (fixture)

PRETOKEN_RE = bpe.PRETOKEN_RE


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(params=["array phase only", "str words only", "switch after 7 merges"])
def merge_phases(request, monkeypatch):
    """The merge loop's two representations (fast_bpe._FlatWords, then str words), each alone and with the switch between
    them part way through, whatever the words per merge: every test using this runs three times."""
    if request.param == "array phase only":
        monkeypatch.setattr(fast_bpe._FlatWords, "MIN_WORDS", 0)
    elif request.param == "str words only":
        monkeypatch.setattr(fast_bpe._FlatWords, "MIN_WORDS", float("inf"))
    else:
        calls = iter(range(10 ** 9))
        monkeypatch.setattr(fast_bpe._FlatWords, "worth_it", lambda self, listed: next(calls) < 7)
    return request.param


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_fast_equals_naive_small(tmp_path, name, merge_phases):
    path = write(tmp_path, CORPORA[name])
    specials = [EOT] if EOT in CORPORA[name] else []
    naive = bpe.train_bpe_naive(path, 256 + len(specials) + 40, specials)
    fast = bpe.train_bpe(path, 256 + len(specials) + 40, specials, fast=True, num_workers=1)
    assert fast == naive


@pytest.mark.parametrize("seed", range(3))
def test_fast_equals_naive_random(tmp_path, seed, merge_phases):
    rng = random.Random(seed)
    text = random_text(rng, 1500, alphabet="abcdeé日", specials=[EOT])
    path = write(tmp_path, text)
    naive = bpe.train_bpe_naive(path, 256 + 1 + 120, [EOT])
    fast = bpe.train_bpe(path, 256 + 1 + 120, [EOT], fast=True, num_workers=1)
    assert fast[1] == naive[1]
    assert fast[0] == naive[0]
    assert len(fast[1]) == 120 and fast[0][256 + 120] == EOT.encode()


def flat_words(words: list[str]) -> "fast_bpe._FlatWords":
    """_FlatWords of words given as strs, one character per token (chr(id)), as the str phase holds them."""
    ids = np.frombuffer("".join(words).encode("utf-32-le", "surrogatepass"), np.uint32)
    return fast_bpe._FlatWords(ids, np.array([len(w) for w in words], np.int64))


def as_counter(table) -> Counter:
    """A PretokenTable as bpe.count_pretokens's Counter of strs."""
    return Counter({pretoken.decode("utf-8"): n for pretoken, n in table.items()})


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
        flat = flat_words(words)
        got = flat.merge(np.array(listed, np.int32), pair, new, np.array(freqs, np.int64))
        expected_words = list(words)
        expected = fast_bpe._rewrite_words(expected_words, freqs, listed, pair, new)
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
        assert fast_bpe.concatenated_ranges(starts, sizes).tolist() == expected.tolist()
    assert fast_bpe.concatenated_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0


def test_flat_words_phase_ends_on_a_lasting_drop_only():
    """worth_it averages the words per merge: one small merge among big ones keeps the array phase, a run of small
    ones ends it."""
    flat = flat_words(["ab"])
    assert all(flat.worth_it(n) for n in [5000] * 20 + [3] + [5000] * 5)
    assert not all(flat.worth_it(3) for _ in range(1000))


def test_queue_entries_sort_as_count_then_greater_bytes():
    """A _PairQueue entry, one str, sorts as the tuple (-count, a's bytes reversed, b's bytes reversed): the higher
    count first, then the greater first byte string, then the greater second one, with prefixes (b"a" < b"ab") and the
    extreme bytes 0 and 255, and counts past 2^16 and 2^48 (the count key's digits)."""
    rng = random.Random(2)
    tokens = sorted({bytes(rng.choices([0, 1, 97, 98, 254, 255], k=rng.randint(1, 3))) for _ in range(60)})
    ids = {t: i for i, t in enumerate(tokens)}
    queue = fast_bpe._PairQueue({}, [fast_bpe._inverted(t) for t in tokens])
    cases = [(rng.choice([1, 2, 7, 65_535, 65_536, 2**48 + 3, 2**63]), rng.choice(tokens), rng.choice(tokens))
             for _ in range(3000)]
    by_entry = sorted(cases, key=lambda c: queue.entry(c[0], chr(ids[c[1]]) + chr(ids[c[2]])))
    by_rule = sorted(cases, key=lambda c: (-c[0], [-x for x in c[1]] + [1], [-x for x in c[2]] + [1]))
    assert by_entry == by_rule
    counts = [0, 1, 2**48 + 3, 2**63]
    assert [fast_bpe._entry_count(queue.entry(n, "\x00\x01")) for n in counts] == counts


@pytest.fixture(scope="module")
def rare_corpus(tmp_path_factory):
    """A corpus and the teaching version's 300 merges on it (computed once for the rare-pair cases)."""
    rng = random.Random(11)
    path = write(tmp_path_factory.mktemp("rare"), random_text(rng, 3000, alphabet="abcdefé", specials=[EOT]))
    return path, bpe.train_bpe_naive(path, 256 + 1 + 300, [EOT])


@pytest.mark.parametrize("rare", [0, 5, 1000])
def test_untracked_rare_pairs_do_not_change_merges(rare_corpus, monkeypatch, merge_phases, rare):
    """_PairQueue leaves new pairs seen at most RARE_PAIR_COUNT times untracked until the heap's top gets down to
    them, and bpe_merges then counts every pair afresh from the words: with none left out (0), the recount two thirds
    of the way through the 300 merges (5) or at the second merge (1000), from the array phase's words or the str
    phase's (merge_phases), the merges are the teaching version's, and the recount ran once."""
    path, naive = rare_corpus
    monkeypatch.setattr(fast_bpe, "RARE_PAIR_COUNT", rare)
    calls = []
    count_pairs = fast_bpe.count_pairs
    monkeypatch.setattr(fast_bpe, "count_pairs", lambda *a: calls.append(a[0].dtype) or count_pairs(*a))
    assert bpe.train_bpe(path, 256 + 1 + 300, [EOT], fast=True, num_workers=1) == naive
    assert len(calls) == (1 if rare == 0 else 2)  # the first count, then the recount


def test_workers_and_pieces_do_not_change_the_result(tmp_path, monkeypatch):
    """Tiny pieces (many safe cuts, incl. next to overlapping special tokens) and 1 or 3 workers: same counts."""
    rng = random.Random(7)
    specials = [EOT, EOT + EOT]
    text = random_text(rng, 4000, alphabet="abcxyzé", specials=[EOT, EOT + EOT, EOT + " x"])
    path = write(tmp_path, text)
    expected = bpe.count_pretokens(text, specials)
    monkeypatch.setattr(fast_bpe, "PIECE_BYTES", 97)
    assert len(fast_bpe.find_piece_boundaries(path, 97, specials)) > 50
    special_re = bpe.special_pattern(specials)
    for workers in (1, 3):
        assert as_counter(fast_bpe.count_pretokens_file(path, specials, PRETOKEN_RE, special_re, workers)) == expected
    # and without special tokens, where the only cuts are before whitespace
    assert as_counter(fast_bpe.count_pretokens_file(path, [], PRETOKEN_RE, None, 3)) == bpe.count_pretokens(text, [])
    assert (bpe.train_bpe(path, 400, specials, fast=True, num_workers=3)
            == bpe.train_bpe(path, 400, specials, fast=True, num_workers=1))


# ---------------------------------------------------------------------------------------------------------------------
# Pre-tokenisation by chunks
# ---------------------------------------------------------------------------------------------------------------------

def test_count_pretokens_matches_plain_regex():
    """The chunk-first counting (see CHUNK_RE) equals counting the GPT-2 regex matches directly (bpe.count_pretokens)."""
    rng = random.Random(3)
    for _ in range(200):
        text = random_unicode(rng, 200)
        assert fast_bpe.count_pretokens(text, PRETOKEN_RE) == bpe.count_pretokens(text) == Counter(regex.findall(bpe.GPT2_PAT, text))
    specials = [EOT, EOT + EOT]
    text = random_text(rng, 500, specials=specials)
    assert (fast_bpe.count_pretokens(text, PRETOKEN_RE, bpe.special_pattern(specials))
            == bpe.count_pretokens(text, specials))


def test_chunks_to_pretokens_groups_by_count():
    """chunks_to_pretokens pre-tokenises the chunks of equal frequency together (ASCII ones by the stdlib pattern):
    on ASCII-heavy text whose chunks occur once or many times, and with the non-joinable kinds (a text's first chunk,
    trailing whitespace), it equals counting the GPT-2 regex matches."""
    rng = random.Random(5)
    pools = ["abcXYZ", "0123", " \t\n\r\x0b\x0c\x1c\x1f", "'sdmtlvre", "!.,(){}-_", "é日"]
    texts = ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(200)]
    text = "".join(rng.choice(texts) for _ in range(500)) + "  \n"
    assert fast_bpe.count_pretokens(text, PRETOKEN_RE) == Counter(regex.findall(bpe.GPT2_PAT, text))
    chunk_counts = fast_bpe.count_chunks(text)
    assert len(set(chunk_counts.values())) >= 5  # several groups
    assert fast_bpe.chunks_to_pretokens(chunk_counts, PRETOKEN_RE) == Counter(regex.findall(bpe.GPT2_PAT, text))


def test_chunk_whitespace_class_matches_regex_whitespace():
    """fast_bpe.WHITESPACE, which CHUNK_RE's classes are built from, is exactly the GPT-2 pattern's \\s (regex) on every
    code point, and the class built from it (stdlib re) matches exactly those characters."""
    ws_re = re.compile(fast_bpe._WS)
    ws_regex = regex.compile(r"\s")
    for cp in range(0x110000):
        c = chr(cp)
        assert bool(ws_re.match(c)) == bool(ws_regex.match(c)) == (c in fast_bpe.WHITESPACE), hex(cp)


def test_pretokens_of_joined_chunks_match_one_by_one():
    """The lemma at work: the chunks' pre-tokens from joined regex calls (_pretokens_of_chunks: ASCII and other chunks
    apart, edge chunks alone) are those of the chunks one by one, and those of the whole text."""
    rng = random.Random(8)
    text = "".join(random_unicode(rng, 50) for _ in range(200))
    chunks = fast_bpe.CHUNK_RE.findall(text)
    assert "".join(chunks) == text
    pretokens = Counter(fast_bpe._pretokens_of_chunks(chunks, PRETOKEN_RE))
    assert pretokens == Counter(p for c in chunks for p in regex.findall(bpe.GPT2_PAT, c))
    assert pretokens == Counter(regex.findall(bpe.GPT2_PAT, text))


def test_ascii_pretoken_regex_matches_gpt2_regex():
    """find_pretokens' stdlib pattern for ASCII text equals the GPT-2 pattern (regex) on every ASCII pair and triple
    of the interesting characters and on random ASCII text; non-ASCII text goes to the regex pattern."""
    special = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f'sdmtlvre aZ09.!_"
    samples = [a + b for a in map(chr, range(128)) for b in map(chr, range(128))]
    samples += [a + b + c for a in special for b in special for c in special]
    rng = random.Random(11)
    samples += ["".join(rng.choice(special + "xyzQ5{}") for _ in range(60)) for _ in range(2000)]
    for text in samples:
        assert text.isascii() and fast_bpe.ASCII_PRETOKEN_RE.findall(text) == regex.findall(bpe.GPT2_PAT, text), repr(text)
    mixed = "naïve  café's 42\u00a0x"
    assert (fast_bpe.find_pretokens(mixed, PRETOKEN_RE) == regex.findall(bpe.GPT2_PAT, mixed)
            != fast_bpe.ASCII_PRETOKEN_RE.findall(mixed))


def test_safe_cut_regex_cuts_where_the_chunks_start():
    """bpe.py's SAFE_CUT_RE (where encode_iterable may cut) finds exactly the starts of CHUNK_RE's chunks, but the
    first: the lemma that both rest on, from the chapter's side and the fast path's."""
    rng = random.Random(4)
    for _ in range(300):
        text = random_unicode(rng, 80)
        starts = list(np.cumsum([len(c) for c in fast_bpe.CHUNK_RE.findall(text)])[:-1])
        assert [m.start() for m in bpe.SAFE_CUT_RE.finditer(text)] == starts, repr(text)


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------

def test_hash_table_equals_a_dict():
    """_HashTable (the batched BPE's merge lookup) gives what a dict gives, for keys in the table (many of them away
    from their home slot: 20,000 keys collide) and keys not in it, and for an empty table."""
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 10**12, 20_000))
    values = rng.integers(-10**12, 10**12, keys.size)
    table = fast_bpe._HashTable(keys, values, missing=-7)
    assert ((table.keys != table.EMPTY).sum() == keys.size
            and (table._slot(table.keys[table.keys != table.EMPTY]) != np.flatnonzero(table.keys != table.EMPTY)).any())
    queries = np.concatenate([keys, rng.integers(0, 10**12, 5_000), keys[::-3]])
    reference = dict(zip(keys.tolist(), values.tolist()))
    assert table.get(queries).tolist() == [reference.get(k, -7) for k in queries.tolist()]
    assert fast_bpe._HashTable(np.array([], np.int64), np.array([], np.int64), -1).get(np.array([0, 5])).tolist() == [-1, -1]


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return bpe.Tokenizer.from_files(*gpt2_files, special_tokens=[EOT])


def test_batched_bpe_equals_bpe_by_rank(trained, gpt2):
    """The fast encoder's _bpe_batch (numpy, all words at once) equals the chapter's _bpe, on random pre-tokens with
    repeats ("aaaa": every other pair of a run) and GPT-2's own tokens."""
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT], fast=True)
    rng = random.Random(12)
    words = [m.group() for m in regex.finditer(bpe.GPT2_PAT, random_unicode(rng, 3000))]
    words += ["".join(rng.choice("ab ") for _ in range(rng.randint(1, 12))) for _ in range(300)] + ["a" * 9, "é" * 7]
    for word in words[:100]:
        assert tok._bpe(word) == replay_merges(tok, word), word
    assert tok._encoder._bpe_batch(words) == [tok._bpe(w) for w in words]
    gpt2_fast = bpe.Tokenizer(gpt2.vocab, gpt2.merges, [EOT], fast=True)
    gpt2_words = [t.decode("utf-8") for t in list(gpt2.vocab.values())[::7] if t.isascii()] + words
    assert gpt2_fast._encoder._bpe_batch(gpt2_words) == [gpt2._bpe(w) for w in gpt2_words]
    assert all(len(ids) == 1 for ids in gpt2_fast._encoder._bpe_batch(gpt2_words[:500]))  # GPT-2's tokens: themselves
    # ids past 65,535 (the packed merge keeps 32 bits of id): the same vocab, every id moved up by 70,000
    shifted = bpe.Tokenizer({i + 70_000: t for i, t in vocab.items()}, merges, [EOT], fast=True)
    assert shifted._encoder._bpe_batch(words) == [tuple(i + 70_000 for i in ids) for ids in tok._encoder._bpe_batch(words)]


def test_batched_cold_path_equals_plain_path(trained, gpt2, monkeypatch):
    """The batched cold path (_cache_chunks: one regex call for many chunks, _bpe_batch) equals the plain encode, on long
    multi-document texts whose first and last chunks start without or end with whitespace, for any batch threshold."""
    vocab, merges = trained
    rng = random.Random(13)
    texts = [EOT.join(random_unicode(rng, rng.randint(0, 400)) for _ in range(30)) for _ in range(20)]
    texts += ["x" + EOT + "  y  " + EOT + "\n", "only-one-chunk", "   ", EOT, ""]
    for plain in (bpe.Tokenizer(vocab, merges, [EOT]), gpt2):
        expected = [plain.encode(text) for text in texts]
        for batch_min in (1, 64):
            monkeypatch.setattr(fast_bpe.Encoder, "BATCH_MIN", batch_min)
            fast = bpe.Tokenizer(plain.vocab, plain.merges, [EOT], fast=True)
            for text, ids in zip(texts, expected):
                assert fast.encode(text) == ids, text


def test_encode_assembles_from_a_warm_cache_and_fills_it_only_for_new_chunks(trained):
    """encode assembles the ids straight from the chunk cache and fills the cache only when a chunk is missing (the
    KeyError path): a fully cached text, and one whose chunks are cached up to a special token and new after it."""
    tok, plain = bpe.Tokenizer(*trained, [EOT], fast=True), bpe.Tokenizer(*trained, [EOT])
    seen = "the cat sat on the mat, twice"
    assert tok.encode(seen) == plain.encode(seen)
    cached = dict(tok._encoder._chunk_cache)
    assert tok.encode(seen) == plain.encode(seen) and tok._encoder._chunk_cache == cached  # warm: nothing added
    partly = seen + EOT + " a dog barked at the postman"
    assert tok.encode(partly) == plain.encode(partly)
    added = set(tok._encoder._chunk_cache) - set(cached)
    assert added and all(chunk in partly.split(EOT)[1] for chunk in added)  # only the new text's chunks


def test_encode_iterable_memory_is_flat(trained):
    """Streaming ~4 MB through the fast encoder (whose caches are bounded, CACHE_LIMIT) peaks at about what ~1 MB
    does, far below the text size."""
    vocab, merges = trained
    tok = bpe.Tokenizer(vocab, merges, [EOT], fast=True)
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
