"""lib/hf_export.py: train.py export / import, a checkpoint as a Hugging Face Llama directory and back.

A Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) is what transformers' AutoModelForCausalLM / AutoTokenizer, the Hub, lm-evaluation-harness
and the vLLM and llama.cpp converters read. The conversions live with what they convert (tensor names, the RoPE
permutation and the config in lib/hf_llama.py; tokenizer.json in lib/tokenizer_formats.py); here are only the
files. The safetensors package is optional: these commands import it, nothing else does.

Neither command loses a file it did not write. Both write everything into a fresh directory beside --out first and
move it in only when all of it is written, so a failure changes nothing there. export's --out must be new, empty or
an earlier export (replaced whole); --force lets it into another directory, replacing only the Hugging Face model
and tokenizer files. import replaces a run's checkpoint or tokenizer only with --overwrite.

    python train.py export runs/ts17m/best.pt --out hf/ts17m
    python train.py import hf/ts17m --out runs/imported
"""
import contextlib
import dataclasses
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path

import bpe
import train
from lib import cli, tokenizer_formats
from lib.checkpoints import (checkpoint_config, checkpoint_tokenizer, load_weights_only, read_checkpoint,
                             tokenizer_fingerprint)
from lib.cli import (BadInputError, EnvironmentFault, OneLineParser, WriteFault, atomic_file, atomic_write_text,
                     describe_fault, error_summary)
from model import TransformerLM
from lib.tokenizer_formats import MISSING, field_problem
from lib.hf_llama import from_hf_llama_config, from_hf_llama_state_dict, to_hf_llama_config, to_hf_llama_state_dict


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # one file, or shards listed in NAME.index.json
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# How an export recognises an earlier one, to replace it whole: its model.safetensors carries this key in its header's
# metadata, listing the files that export wrote. The mark lives in the weights' own header, not in a file beside them,
# so it goes where the weights go and is gone when another tool (save_pretrained, a download, a copy) replaces them:
# a directory whose model is no longer ours is not mistaken for ours. transformers reads only "format" from there.
EXPORT_MARK = "cs336_train_py_export"
# What --force removes from a directory that is not an earlier export (besides replacing EXPORT_FILES): the files
# from which transformers would load another model or tokenizer beside ours; AutoTokenizer, for one, adds the tokens
# of a special_tokens_map.json it finds. Anything else (README.md, .git, notes) is kept.
HF_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                  "tf_model*.h5", "flax_model*.msgpack", "adapter_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                  "chat_template.jinja", "chat_template.json")

# Names that mark a directory train.py or bpe.py wrote (HF's special-tokens file is special_tokens_map.json).
PROJECT_FILES = ("last.pt", "log.jsonl", "special_tokens.json")


def export_hf(ckpt_path, out_dir, tokenizer_dir=None, force: bool = False) -> Path:
    """A train.py checkpoint -> a Hugging Face Llama directory that from_pretrained loads with no custom code.
    Everything is written beside `out_dir` first, then moved in (install), so a failure leaves `out_dir` as it was."""
    if Path(ckpt_path).is_dir():
        raise BadInputError(f"{ckpt_path} is a directory, not a checkpoint: pass a .pt file in it, e.g. "
                            f"{Path(ckpt_path) / 'best.pt'}")
    ckpt = read_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt, ckpt_path)
    tensors = to_hf_llama_state_dict(cfg, ckpt["model"])  # refuses the ablations HF Llama cannot express
    tok = checkpoint_tokenizer(ckpt, tokenizer_dir, cfg.vocab_size, src=ckpt_path)
    if tok is None:
        raise BadInputError(f"checkpoint {ckpt_path} names no tokenizer_dir: pass --tokenizer DIR")
    safetensors_torch = cli.optional_import("safetensors.torch", "safetensors", "writing model.safetensors")
    eot = tok.special_token_ids.get(bpe.END_OF_TEXT)  # BOS and EOS, as GPT-2's <|endoftext|> is both
    try:
        tokenizer_formats.hf_tokenizer_json(tok)  # one tokenizer.json cannot hold is refused before any write
    except ValueError as e:
        raise BadInputError(f"tokenizer of {ckpt_path}: {e}") from None
    out = Path(out_dir)
    stale = export_replaces(out, force)
    with staging_dir(out) as tmp:
        # note: safetensors.torch.save returns the file as bytes (the weights once more in memory) for atomic_file
        # to write all or nothing; transformers checks for the "format": "pt" metadata.
        data = sorted_header(safetensors_torch.save(tensors, metadata={"format": "pt",
                                                                      EXPORT_MARK: ",".join(EXPORT_FILES)}))
        with atomic_file(tmp / HF_WEIGHTS[0], needed=len(data)) as f:
            f.write(data)
        for name, obj in (("config.json", to_hf_llama_config(cfg, eot, eot)),
                          ("generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})):
            atomic_write_text(tmp / name, json.dumps(obj, indent=2) + "\n")
        tokenizer_formats.save_hf_tokenizer(tok, tmp, model_max_length=cfg.context_length)
        install(tmp, out, stale)
    return out


def sorted_header(data: bytes) -> bytes:
    """A .safetensors file with its JSON header's keys sorted. subtle: safetensors writes the metadata from a hash map
    whose order changes from process to process, so with two metadata keys two exports of one model differed in
    their bytes half of the time. The file starts with the header's length (8 bytes, little-endian), then the
    header, padded with spaces; the same keys in another order have the same length, so the data does not move."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + size]), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    header = header.encode("utf-8")
    return data[:8] + header.ljust(size) + data[8 + size:] if len(header) <= size else data


def export_replaces(out: Path, force: bool) -> list[str]:
    """The names in `out` that an export removes before moving its own files in: all of an earlier export (it is
    replaced whole), or with --force the Hugging Face model files (HF_MODEL_FILES) of any other directory. A
    non-empty directory that is not an earlier export is refused without --force; so, even with it, is a run or
    tokenizer directory of this project, whose config.json, vocab.json and merges.txt --force would replace."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} is a file, not a directory: pass a new or empty directory as --out")
    try:
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as e:
        raise EnvironmentFault(f"cannot read {out}: {describe_fault(e, out)}") from None
    foreign = [n for n in names if n not in (export_mark(out / HF_WEIGHTS[0]) or [])]
    if not foreign:
        return names
    own = [name for name in PROJECT_FILES if name in names]
    if own:
        raise BadInputError(f"{out} holds {own[0]}: it is a run or tokenizer directory of this project, whose files "
                            f"an export would replace or delete; pass a new or empty directory as --out")
    if not force:
        raise BadInputError(f"{out} is not empty and not an earlier export (it holds {cli.some_of(foreign)}): pass "
                            f"--force to replace the Hugging Face model and tokenizer files in it and keep the rest, "
                            f"or a new or empty directory as --out")
    return [n for n in names if any(fnmatch.fnmatch(n, pattern) for pattern in HF_MODEL_FILES)]


def export_mark(weights: Path) -> list[str] | None:
    """The files an earlier export listed in the header of its model.safetensors (EXPORT_MARK), or None for any other
    file. A .safetensors file starts with the header's length (8 bytes, little-endian), then the header, JSON."""
    try:
        with open(weights, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if size < 10_000_000 else None
    except (OSError, ValueError):  # absent, unreadable, or not a safetensors file: not ours
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    mark = metadata.get(EXPORT_MARK) if isinstance(metadata, dict) else None
    return mark.split(",") if isinstance(mark, str) else None


@contextlib.contextmanager
def staging_dir(out: Path):
    """A new hidden directory beside `out` (same file system, so its files move into `out` by rename) to write into
    first; removed, with whatever is left in it, when the block ends. The parent directories of `out` that had to
    be made are removed again if the block fails."""
    made = [p for p in out.absolute().parents if not p.exists()]  # innermost first
    tmp = None
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
        yield tmp
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # rmdir leaves a directory that something else has written into
            with contextlib.suppress(OSError):
                p.rmdir()
        if tmp is None and isinstance(e, OSError):  # the directory could not be made: name it, not an errno
            raise WriteFault(out, describe_fault(e, out)) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def install(tmp: Path, out: Path, stale: list[str]) -> None:
    """Move every file of `tmp` into `out` (made if absent) after removing the `stale` names there. Each move is a
    rename within one file system: nothing is copied, so nothing can fail half-way for want of space."""
    try:
        out.mkdir(exist_ok=True)
        for name in stale:
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
    except OSError as e:
        raise WriteFault(out, describe_fault(e, out)) from None


def import_hf(hf_dir, run_dir, overwrite: bool = False) -> Path:
    """A Hugging Face Llama directory -> RUN/last.pt (weights and model config, no training state) and the tokenizer
    files beside it, so sample.py, --eval and --init-from work on it as on any run of train.py. All of it is written
    beside RUN first and moved in at the end, so a failure changes nothing in RUN."""
    src, run = Path(hf_dir), Path(run_dir)
    check_import_paths(src, run, overwrite)
    cfg = from_hf_llama_config(read_json(src / "config.json"), str(src / "config.json"))
    tok = hf_dir_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise BadInputError(f"{src}: tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
                            f"{cfg.vocab_size}")
    state = from_hf_llama_state_dict(cfg, read_hf_weights(src), str(src))
    # The model is built on the meta device (no memory, no random init) and takes the imported tensors as its own.
    model = TransformerLM(**dataclasses.asdict(cfg), device="meta")
    model.load_state_dict(state, assign=True)
    with staging_dir(run) as tmp:
        tok.save_dir(tmp)
        # the fingerprint of the tokenizer imported, not of whatever RUN holds until install() moves it in
        train.save_checkpoint(model, None, 0, tmp / "last.pt", tokenizer_dir=str(run.resolve()),
                              tokenizer_fingerprint=tokenizer_fingerprint(tok), tokenizer_vocab_size=tok.vocab_size,
                              imported_from=str(src.resolve()))
        install(tmp, run, [])
    return run


IMPORT_FILES = ("last.pt", "vocab.json", "merges.txt", "special_tokens.json")  # what import writes into RUN


def check_import_paths(src: Path, run: Path, overwrite: bool) -> None:
    """One line for an HF directory that is not a directory, or a RUN that is a file or whose checkpoint or tokenizer
    an import would replace without --overwrite."""
    if src.exists() and not src.is_dir():
        raise BadInputError(f"{src} is a file, not a directory: pass the Hugging Face model directory that holds it, "
                            f"{src.parent}")
    if not src.exists():
        raise BadInputError(f"{src} does not exist: pass a Hugging Face model directory (config.json, "
                            f"model.safetensors, tokenizer.json)")
    if run.exists() and not run.is_dir():
        raise BadInputError(f"{run} is a file, not a directory: pass a new directory (or a run, with --overwrite) "
                            f"as --out")
    replaced = [name for name in IMPORT_FILES if (run / name).exists()]
    if replaced and not overwrite:
        what = "a checkpoint" if replaced[0] == "last.pt" else f"a tokenizer ({replaced[0]})"
        raise BadInputError(f"{run} already holds {what}: pass --overwrite or a new --out")


def read_json(path: Path):
    """A JSON file of a model directory, or a one-line BadInputError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist: is {path.parent} a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:  # permission denied, an I/O error: the machine's fault, named with the file
        raise EnvironmentFault(f"cannot read {path}: {describe_fault(e, path)}") from None


def hf_dir_tokenizer(src: Path) -> bpe.Tokenizer:
    """The Tokenizer of an HF directory's tokenizer.json; anything but byte-level BPE is refused with one line."""
    path = src / "tokenizer.json"
    if not path.is_file():
        found = "a SentencePiece tokenizer.model" if (src / "tokenizer.model").is_file() else "no tokenizer.json"
        raise BadInputError(f"{src} has {found}: only a byte-level BPE tokenizer.json can be imported")
    try:
        return tokenizer_formats.tokenizer_from_hf_json(read_json(path), str(path))
    except ValueError as e:
        raise BadInputError(str(e)) from None


def read_hf_weights(src: Path) -> dict:
    """Every tensor of an HF directory: model.safetensors or pytorch_model.bin, or the shards their .index.json
    names. note: a .bin is a pickle; weights_only=True loads its tensors without running any of its code."""
    for name in HF_WEIGHTS:
        index = src / f"{name}.index.json"
        if (src / name).is_file():
            files = [src / name]
        elif index.is_file():
            files = shard_files(src, index)
        else:
            continue
        if name.endswith(".safetensors"):
            load = cli.optional_import("safetensors.torch", "safetensors", f"reading {name}").load_file
        else:
            load = load_weights_only
        tensors = {}
        for path in files:
            try:
                tensors.update(load(path))
            except PermissionError as e:  # the machine's fault, not the file's
                raise EnvironmentFault(f"cannot read {path}: {describe_fault(e, path)}") from None
            except Exception as e:  # truncated, not a weights file, or a pickle of more than tensors
                raise BadInputError(f"{path} is corrupt or not a weights file ({error_summary(e)})") from None
        return tensors
    raise BadInputError(f"{src} has no {' or '.join(HF_WEIGHTS)} (nor a sharded .index.json)")


def shard_files(src: Path, index: Path) -> list[Path]:
    """The shard files an NAME.index.json lists in its weight_map ({tensor name: file name}), each checked to be a
    plain file of `src`: a name with ".." or an absolute path would read a file outside the model directory."""
    obj = read_json(index)
    weight_map = obj.get("weight_map", MISSING) if isinstance(obj, dict) else obj
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
        raise BadInputError(field_problem(str(index), "weight_map", "an object of tensor name -> shard file name",
                                          weight_map))
    for name in sorted(set(weight_map.values())):
        if Path(name).is_absolute() or ".." in Path(name).parts or not name:
            raise BadInputError(f"{index}: weight_map names {name!r}, outside {src}: shard files must lie in the "
                                f"model directory")
        if not (src / name).is_file():
            raise BadInputError(f"{index}: weight_map names {name!r}, which {src} does not hold")
    return sorted({src / name for name in weight_map.values()})


def export_main(argv) -> None:
    p = OneLineParser(prog="train.py export", description="a checkpoint as a Hugging Face Llama directory")
    p.add_argument("ckpt", help="a .pt that train.py wrote (e.g. RUN/best.pt)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--force", action="store_true",
                   help="export into a non-empty directory that is not an earlier export (say, a clone of a Hub "
                        "repository): its config.json, generation_config.json, tokenizer.json and "
                        "tokenizer_config.json are replaced, the files from which transformers would load another "
                        "model or tokenizer are removed (*.safetensors and their index, pytorch_model*.bin, "
                        "special_tokens_map.json, added_tokens.json, vocab.json, merges.txt, tokenizer.model, ...), "
                        "and everything else (README.md, .git, ...) is kept; a run or tokenizer directory of this "
                        "project is refused even so. Without it, DIR must be new, empty or an earlier export, which "
                        "is replaced whole")
    a = p.parse_args(argv)
    out = export_hf(a.ckpt, a.out, a.tokenizer, a.force)
    print(f"wrote {out}/ (config.json, model.safetensors, tokenizer.json, ...): "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer load it")


def import_main(argv) -> None:
    p = OneLineParser(prog="train.py import", description="a Hugging Face Llama directory as a run directory")
    p.add_argument("hf_dir", metavar="DIR", help="config.json, model.safetensors or pytorch_model.bin, tokenizer.json")
    p.add_argument("--out", required=True, metavar="RUN")
    p.add_argument("--overwrite", action="store_true", help="replace RUN/last.pt")
    a = p.parse_args(argv)
    run = import_hf(a.hf_dir, a.out, a.overwrite)
    print(f"wrote {run}/last.pt and its tokenizer; next: python sample.py {run}/last.pt, or fine-tune with "
          f"python train.py --init-from {run}/last.pt --data DIR")
