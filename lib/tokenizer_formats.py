"""tokenizer_formats.py: bpe.py's tokenizers in other libraries' file formats (`bpe.py export`, train.py export and
import): Hugging Face tokenizer.json / tokenizer_config.json, and tiktoken's .tiktoken file. An upper-floor module:
it imports bpe.py; bpe.py imports it only inside its export command.

    python bpe.py export --tokenizer runs/tok --format hf --out runs/tok-hf   # or --format tiktoken --out tok.tiktoken
"""
import base64
import json
from pathlib import Path

from bpe import CHAR_TO_BYTE, END_OF_TEXT, GPT2_PAT, Tokenizer, str_to_token, token_to_str
from lib.cli import atomic_write_text, some_of

# Both libraries can run a Tokenizer exactly (tests/test_hf.py compares ids on random Unicode, special tokens and real
# text): HF `tokenizers` as a BPE model with our merges in rank order behind the GPT-2 regex, tiktoken with each token's
# rank = its id. Both files are plain JSON / text, so this module needs neither library; `tokenizer_from_hf_json`
# reads a tokenizer.json back (train.py import), refusing what Tokenizer cannot reproduce.

def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The tokenizer.json of `tok`: what tokenizers.Tokenizer.from_file and transformers' AutoTokenizer load.
    hf_tokenizer_json(tok)["model"]["merges"][0] == ["Ġ", "t"] for a tokenizer whose first merge is (b" ", b"t")."""
    # Pitfalls, each of which changes ids (found by checking against tiktoken):
    #   - ByteLevel's default add_prefix_space=True puts a space before the text (" hello" instead of "hello");
    #   - Split with a plain string pattern matches that string literally: the GPT-2 regex must be {"Regex": ...};
    #   - merges are written as pairs, not "a b" strings, so no token's characters can be split wrongly.
    # subtle: ByteLevel(use_regex=False) after our Split, not ByteLevel(use_regex=True): the latter is the same GPT-2
    # regex today, but spelling it out keeps the file independent of the library's built-in pattern.
    specials = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True} for s, i in sorted(tok.special_token_ids.items(), key=lambda item: item[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GPT2_PAT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": _hf_vocab(tok),
                  # a repeated pair keeps its first rank, as Tokenizer does (HF would keep the last)
                  "merges": [[token_to_str(a), token_to_str(b)] for a, b in dict.fromkeys(tok.merges)]},
    }


def _hf_vocab(tok: Tokenizer) -> dict[str, int]:
    """The BPE model's vocab: each token in byte-level characters (token_to_str), but a special token as its plain
    text. subtle: when HF loads tokenizer.json, an added token keeps its id only if the vocab holds its content under
    that id; otherwise it gets a fresh id past the vocab (a special token with a space in it would move)."""
    special_ids = {i: s for s, i in tok.special_token_ids.items()}
    for s in special_ids.values():
        # subtle: HF's ByteLevel decoder reads a token made only of byte-level characters as bytes ("é" is byte 0xE9),
        # added tokens included; any other character makes it take the token's UTF-8 as it is.
        if all(c in CHAR_TO_BYTE for c in s) and token_to_str(s.encode("utf-8")) != s:
            raise ValueError(f"special token {s!r} would decode wrongly in Hugging Face tokenizers (its ByteLevel "
                             f"decoder reads {s!r} as the bytes {bytes(CHAR_TO_BYTE[c] for c in s)!r}); rename it")
    vocab = {special_ids.get(i) or token_to_str(t): i for i, t in sorted(tok.vocab.items())}
    if len(vocab) != len(tok.vocab):
        raise ValueError("a special token's text is the byte-level spelling of another token; tokenizer.json cannot "
                         "hold both")
    return vocab


def hf_tokenizer_config(tok: Tokenizer, model_max_length: int | None = None) -> dict:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json (no custom code), <|endoftext|> (when
    there is one) as BOS and EOS, as in GPT-2; no clean-up of spaces, which would change decoded text."""
    eot = END_OF_TEXT if END_OF_TEXT in tok.special_token_ids else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_hf_tokenizer writes
# What `bpe.py export --format hf --force` removes from a directory that holds more than an earlier export: the
# files from which AutoTokenizer would load other tokens beside ours (it adds the tokens of a special_tokens_map.json
# it finds) or another tokenizer instead. Anything else (model weights, README.md) is kept.
OTHER_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                         "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json")


def hf_tokenizer_replaces(out: Path, force: bool) -> list[str]:
    """The names in `out` that a tokenizer export removes after writing its own: none from an earlier export (it
    holds only HF_TOKENIZER_FILES, which are replaced), the other tokenizers' files with --force. Any other non-empty
    directory is refused without --force, and a tokenizer directory of this project (special_tokens.json beside
    vocab.json and merges.txt) even with it: --force would delete the tokenizer it holds."""
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    others = [n for n in names if n not in HF_TOKENIZER_FILES]
    if not others:
        return []
    if "special_tokens.json" in names:
        raise ValueError(f"--out {out} is a tokenizer directory of this project (special_tokens.json), whose files "
                         f"the export would delete; give a new or empty directory")
    if not force:
        raise ValueError(f"--out {out} is not empty and not an earlier tokenizer export (it holds {some_of(others)}): "
                         f"pass --force to replace the tokenizer files in it and keep the rest, or a new or empty "
                         f"directory")
    return [n for n in others if n in OTHER_TOKENIZER_FILES]


def save_hf_tokenizer(tok: Tokenizer, directory, model_max_length: int | None = None) -> None:
    """directory/tokenizer.json and tokenizer_config.json: what AutoTokenizer.from_pretrained(directory) reads."""
    d = Path(directory)
    atomic_write_text(d / "tokenizer.json", json.dumps(hf_tokenizer_json(tok), ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(d / "tokenizer_config.json",
                      json.dumps(hf_tokenizer_config(tok, model_max_length), indent=2) + "\n")


def tiktoken_ranks(tok: Tokenizer) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks (token bytes -> rank = id), special tokens left out (they are passed separately).

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. That is our merge order
    only if every merge makes a new token with a higher id than the merges before it, and every multi-byte token is
    made by a merge: true of train_bpe's vocabularies and GPT-2's, refused (ValueError) for any other."""
    token_ids = {t: i for i, t in tok.vocab.items()}
    special_ids = set(tok.special_token_ids.values())
    previous = -1
    for rank, (a, b) in enumerate(tok.merges):
        made = token_ids[a + b]
        if made <= previous:
            raise ValueError(f"merge {rank} ({token_to_str(a)} {token_to_str(b)}) makes token id {made}, not above the "
                             f"previous merge's {previous}: tiktoken ranks tokens by id, so this tokenizer's merge "
                             f"order cannot be expressed")
        previous = made
    made_ids = {token_ids[a + b] for a, b in tok.merges}
    stray = sorted(i for i, t in tok.vocab.items() if len(t) > 1 and i not in made_ids and i not in special_ids)
    if stray:
        raise ValueError(f"token id {stray[0]} ({token_to_str(tok.vocab[stray[0]])}) is made by no merge: tiktoken "
                         f"would still produce it, Tokenizer never does")
    return {t: i for i, t in sorted(tok.vocab.items()) if i not in special_ids}


def tiktoken_file_text(tok: Tokenizer) -> str:
    """The .tiktoken file: one "base64(token bytes) rank" line per token, the format tiktoken.load.load_tiktoken_bpe
    reads. tiktoken_file_text(tok).splitlines()[32] == "IA== 32" (the space byte) for a train_bpe tokenizer."""
    return "".join(f"{base64.b64encode(t).decode('ascii')} {i}\n" for t, i in tiktoken_ranks(tok).items())


def tiktoken_one_liner(tok: Tokenizer, path) -> str:
    """The Python line that builds a tiktoken.Encoding from the .tiktoken file at `path` (the file holds no special
    tokens and no regex, so the line carries them)."""
    return (f"import tiktoken, tiktoken.load; enc = tiktoken.Encoding(name={Path(path).stem!r}, pat_str={GPT2_PAT!r}, "
            f"mergeable_ranks=tiktoken.load.load_tiktoken_bpe({str(path)!r}), "
            f"special_tokens={dict(tok.special_token_ids)!r})")


def tokenizer_from_hf_json(obj: dict, where: str, *, fast=False) -> Tokenizer:
    """A Tokenizer from a Hugging Face tokenizer.json (parsed): byte-level BPE behind the GPT-2 regex, as GPT-2's and
    hf_tokenizer_json's are. What Tokenizer would encode differently is a ValueError naming it, e.g. a SentencePiece
    (Metaspace / byte-fallback) tokenizer, a normalizer, another split regex or ignore_merges (Llama 3's); so is a
    file of the wrong shape (check_hf_tokenizer_json). fast: as Tokenizer's."""
    check_hf_tokenizer_json(obj, where)
    model = obj["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: the model is {model.get('type')!r}, not BPE: only byte-level BPE tokenizers can be "
                         f"imported")
    _check_hf_byte_level(obj, where)
    for key, harmless in (("dropout", (None, 0.0)), ("continuing_subword_prefix", (None, "")),
                          ("end_of_word_suffix", (None, "")), ("byte_fallback", (False,)),
                          ("ignore_merges", (False,))):
        if model.get(key) not in harmless:
            raise ValueError(f"{where}: the BPE model sets {key}={model[key]!r}, which bpe.Tokenizer does not have")
    # An added token's id is its own even when the BPE vocab lists it too (HF's added tokens take precedence), and its
    # content is plain text, not byte-level characters.
    added = {a["id"]: a for a in obj.get("added_tokens") or []}
    vocab = {i: str_to_token(s, where) for s, i in model["vocab"].items() if i not in added}
    merges = [tuple(str_to_token(p, where) for p in merge_pair(m)) for m in model.get("merges") or []]
    for i, a in sorted(added.items()):
        if any(a.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise ValueError(f"{where}: added token {a['content']!r} strips spaces or matches whole words only, "
                             f"which bpe.Tokenizer's special tokens do not")
        vocab[i] = a["content"].encode("utf-8")
    specials = [added[i]["content"] for i in sorted(added)]
    return Tokenizer(vocab, merges, specials, fast=fast)


def _check_hf_byte_level(obj: dict, where: str) -> None:
    """ValueError unless the pre-tokenizer is GPT-2's (ByteLevel with its built-in regex, or Split(GPT-2 regex) then
    ByteLevel), without a prefix space, with no normalizer and a ByteLevel decoder."""
    pre = obj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if "ByteLevel" not in kinds or (obj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: not a byte-level tokenizer (pre-tokenizer {'+'.join(map(str, kinds))}, decoder "
                         f"{(obj.get('decoder') or {}).get('type')}): only byte-level BPE can be imported")
    byte_level = steps[kinds.index("ByteLevel")]
    gpt2_split = {"type": "Split", "pattern": {"Regex": GPT2_PAT}, "behavior": "Isolated", "invert": False}
    if not (kinds == ["ByteLevel"] and byte_level.get("use_regex", True)
            or steps == [gpt2_split, byte_level] and not byte_level.get("use_regex", True)):
        patterns = [step.get("pattern") for step in steps if step.get("type") == "Split"]
        raise ValueError(f"{where}: the pre-tokenizer ({'+'.join(map(str, kinds))}, split by {patterns or 'nothing'}) "
                         f"does not split by GPT-2's regex, the one bpe.Tokenizer uses")
    if byte_level.get("add_prefix_space", True):
        raise ValueError(f"{where}: ByteLevel add_prefix_space is true (a space is put before every text), which "
                         f"bpe.Tokenizer does not do")
    if obj.get("normalizer") is not None:
        raise ValueError(f"{where}: the tokenizer has a normalizer ({obj['normalizer'].get('type')}), which "
                         f"bpe.Tokenizer does not")



# ---------------------------------------------------------------------------------------------------------------------
# The shape of a tokenizer.json, checked before it is read: a file from the Hub, another tool or a hand edit is one
# line naming the field and what it must be, never a TypeError or KeyError from deep inside the conversion.
# ---------------------------------------------------------------------------------------------------------------------

MISSING = object()  # a key the file does not have (None would be JSON's null)


def json_shown(value) -> str:
    """A JSON value as an error names it: null, 0, "2", true as written; a list or an object by its kind."""
    if value is MISSING:
        return "nothing (the key is missing)"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:36] + '..."'


def field_problem(where: str, field: str, expected: str, value) -> str:
    """'hf/config.json: rope_theta must be a positive number, got null': the one line of a field of the wrong type."""
    return f"{where}: {field} must be {expected}, got {json_shown(value)}"


def is_int(value, minimum: int) -> bool:
    """A JSON integer >= minimum; JSON's true/false are bools, which Python counts as ints, so they are excluded."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def merge_pair(merge) -> list:
    """A merge as tokenizer.json writes it, "a b" (older files) or ["a", "b"], as its two token strings."""
    return merge.split(" ") if isinstance(merge, str) else merge


def check_hf_tokenizer_json(obj, where: str) -> None:
    """ValueError naming the first field tokenizer_from_hf_json reads that has the wrong type or range."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds {json_shown(obj)}, not a JSON object: is it a Hugging Face tokenizer.json?")
    model = obj.get("model", MISSING)
    if not isinstance(model, dict):
        raise ValueError(field_problem(where, "model", 'an object (the BPE model: "type", "vocab", "merges")', model))
    vocab = model.get("vocab", MISSING)
    if not isinstance(vocab, dict):
        raise ValueError(field_problem(where, "model.vocab", "an object of token -> id", vocab))
    owner = {}
    for token, i in vocab.items():
        if not is_int(i, 0):
            raise ValueError(field_problem(where, f"model.vocab[{json_shown(token)}]", "an integer id >= 0", i))
        if owner.setdefault(i, token) != token:
            raise ValueError(f"{where}: model.vocab gives id {i} to both {json_shown(owner[i])} and "
                             f"{json_shown(token)}")
    merges = model.get("merges", [])
    if not isinstance(merges, list):
        raise ValueError(field_problem(where, "model.merges", "a list of merges", merges))
    for rank, merge in enumerate(merges):
        pair = merge_pair(merge) if isinstance(merge, (str, list)) else None
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise ValueError(field_problem(where, f"model.merges[{rank}]", '"a b" or ["a", "b"]', merge))
    check_hf_added_tokens(obj.get("added_tokens", []), where)
    for key in ("pre_tokenizer", "decoder", "normalizer"):
        if not isinstance(obj.get(key), (dict, type(None))):
            raise ValueError(field_problem(where, key, "an object or null", obj[key]))
    steps = (obj.get("pre_tokenizer") or {}).get("pretokenizers", [])
    if not (isinstance(steps, list) and all(isinstance(step, dict) for step in steps)):
        raise ValueError(field_problem(where, "pre_tokenizer.pretokenizers", "a list of objects", steps))


def check_hf_added_tokens(added, where: str) -> None:
    """added_tokens: null or a list of {"id": int >= 0, "content": non-empty str}, flags true/false if present."""
    if added is None:
        return
    if not isinstance(added, list):
        raise ValueError(field_problem(where, "added_tokens", "a list of objects", added))
    for k, a in enumerate(added):
        if not (isinstance(a, dict) and is_int(a.get("id"), 0) and isinstance(a.get("content"), str) and a["content"]):
            raise ValueError(field_problem(where, f"added_tokens[{k}]", 'an object with an integer "id" >= 0 and a '
                                           'non-empty string "content"', a))
        for flag in ("lstrip", "rstrip", "single_word"):
            if not isinstance(a.get(flag, False), bool):
                raise ValueError(field_problem(where, f"added_tokens[{k}].{flag}", "true or false", a[flag]))
