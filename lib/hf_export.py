"""lib/hf_export.py: train.py export / import, a checkpoint as a Hugging Face Llama directory and back.

A Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) is what transformers' AutoModelForCausalLM / AutoTokenizer, the Hub, lm-evaluation-harness
and the vLLM and llama.cpp converters read. The conversions live with what they convert (tensor names, the RoPE
permutation and the config in lib/hf_llama.py; tokenizer.json in lib/tokenizer_formats.py); here are only the
files. The safetensors package is optional: these commands import it, nothing else does.

    python train.py export runs/ts17m/best.pt --out hf/ts17m
    python train.py import hf/ts17m --out runs/imported
"""
import dataclasses
import json
from pathlib import Path

import bpe
import train
from lib import cli, tokenizer_formats
from lib.checkpoints import checkpoint_config, checkpoint_tokenizer, load_weights_only, read_checkpoint
from lib.cli import BadInputError, OneLineParser, atomic_file, atomic_write_text, error_summary
from model import TransformerLM
from lib.hf_llama import from_hf_llama_config, from_hf_llama_state_dict, to_hf_llama_config, to_hf_llama_state_dict


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # one file, or shards listed in NAME.index.json


def export_hf(ckpt_path, out_dir, tokenizer_dir=None) -> Path:
    """A train.py checkpoint -> a Hugging Face Llama directory that from_pretrained loads with no custom code."""
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
    out.mkdir(parents=True, exist_ok=True)
    # note: safetensors.torch.save returns the file as bytes (the weights once more in memory) for atomic_file to
    # write all or nothing; transformers checks for the "format": "pt" metadata.
    data = safetensors_torch.save(tensors, metadata={"format": "pt"})
    with atomic_file(out / HF_WEIGHTS[0], needed=len(data)) as f:
        f.write(data)
    for name, obj in (("config.json", to_hf_llama_config(cfg, eot, eot)),
                      ("generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})):
        atomic_write_text(out / name, json.dumps(obj, indent=2) + "\n")
    tokenizer_formats.save_hf_tokenizer(tok, out, model_max_length=cfg.context_length)
    return out


def import_hf(hf_dir, run_dir, overwrite: bool = False) -> Path:
    """A Hugging Face Llama directory -> RUN/last.pt (weights and model config, no training state) and the tokenizer
    files beside it, so sample.py, --eval and --init-from work on it as on any run of train.py."""
    src, run = Path(hf_dir), Path(run_dir)
    if (run / "last.pt").exists() and not overwrite:
        raise BadInputError(f"{run} already holds a checkpoint: pass --overwrite or a new --out")
    cfg = from_hf_llama_config(read_json(src / "config.json"), str(src / "config.json"))
    tok = hf_dir_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise BadInputError(f"{src}: tokenizer.json has {tok.vocab_size} tokens but config.json's vocab_size is "
                            f"{cfg.vocab_size}")
    state = from_hf_llama_state_dict(cfg, read_hf_weights(src), str(src))
    # The model is built on the meta device (no memory, no random init) and takes the imported tensors as its own.
    model = TransformerLM(**dataclasses.asdict(cfg), device="meta")
    model.load_state_dict(state, assign=True)
    run.mkdir(parents=True, exist_ok=True)
    tok.save_dir(run)
    train.save_checkpoint(model, None, 0, run / "last.pt", tokenizer_dir=str(run.resolve()),
                    imported_from=str(src.resolve()))
    return run


def read_json(path: Path):
    """A JSON file of a model directory, or a one-line BadInputError saying what is wrong with it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"{path} does not exist: is {path.parent} a Hugging Face model directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path} is not valid JSON ({e})") from None


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
            files = sorted({src / shard for shard in read_json(index)["weight_map"].values()})
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
            except Exception as e:  # truncated, not a weights file, or a pickle of more than tensors
                raise BadInputError(f"{path} is corrupt or not a weights file ({error_summary(e)})") from None
        return tensors
    raise BadInputError(f"{src} has no {' or '.join(HF_WEIGHTS)} (nor a sharded .index.json)")


def export_main(argv) -> None:
    p = OneLineParser(prog="train.py export", description="a checkpoint as a Hugging Face Llama directory")
    p.add_argument("ckpt", help="a .pt that train.py wrote (e.g. RUN/best.pt)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    a = p.parse_args(argv)
    out = export_hf(a.ckpt, a.out, a.tokenizer)
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
