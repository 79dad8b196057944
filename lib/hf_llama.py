"""hf_llama.py: model.py <-> Hugging Face transformers' LlamaForCausalLM (config.json and the state dict).

Serves model.py and train.py's `export` / `import` commands (lib/hf_export.py). Upper floor of lib/: it imports
model.py. tests/test_hf.py checks the logits against transformers' own model.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lib.cli import BadInputError
from lib.tokenizer_formats import MISSING, field_problem, is_int, json_shown
from model import RMS_NORM_EPS, ModelConfig, TransformerLM

# TransformerLM with norm="pre", position="rope", ffn="swiglu" is Llama's architecture (Touvron et al. 2023):
# pre-norm RMSNorm, SwiGLU, RoPE, no biases. So a checkpoint converts to a transformers LlamaForCausalLM (and back)
# by renaming tensors and one permutation (rope_pairs_to_halves); nothing is re-derived or approximated.
# tests/test_hf.py checks the logits against transformers' own model.

# Our state-dict names -> HF's, outside the blocks and inside block i ("layers.{i}." <-> "model.layers.{i}.").
HF_LLAMA_NAMES = {"token_embeddings.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight",
                  "lm_head.weight": "lm_head.weight"}
HF_LLAMA_LAYER_NAMES = {"attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
                        "attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj",
                        "ln1": "input_layernorm", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
                        "ffn.w2": "mlp.down_proj", "ln2": "post_attention_layernorm"}
ROPE_PROJECTIONS = ("attn.q_proj.weight", "attn.k_proj.weight")  # the rows RoPE rotates: permuted on conversion
# The ablations a LlamaConfig cannot express: field -> (the only value HF Llama has, what that value means).
HF_LLAMA_FIXED = {"norm": ("pre", "pre-norm RMSNorm"), "position": ("rope", "RoPE in every attention layer"),
                  "ffn": ("swiglu", "the gated SwiGLU FFN (gate, up and down projections)")}


def hf_llama_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) of every tensor HF stores, in order. A tied lm_head is left out: HF stores only
    model.embed_tokens.weight and ties lm_head to it (tie_word_embeddings)."""
    names = [("token_embeddings.weight", HF_LLAMA_NAMES["token_embeddings.weight"])]
    for i in range(cfg.num_layers):
        names += [(f"layers.{i}.{ours}.weight", f"model.layers.{i}.{hf}.weight")
                  for ours, hf in HF_LLAMA_LAYER_NAMES.items()]
    names.append(("ln_final.weight", HF_LLAMA_NAMES["ln_final.weight"]))
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", HF_LLAMA_NAMES["lm_head.weight"]))
    return names


def rope_pairs_to_halves(w: Tensor, num_heads: int) -> Tensor:
    """q_proj/k_proj weight (H·D, C) from our RoPE layout to HF Llama's: per head, output rows 0, 2, 4, ..., D-2,
    then 1, 3, ..., D-1.

    subtle: our RoPE rotates adjacent pairs (x[2k], x[2k+1]) by angle k; HF's rotate_half rotates (x[k], x[k+D/2]).
    Moving row 2k to k and row 2k+1 to k+D/2 makes HF's rotation act on exactly the numbers ours does, and since
    q·k sums over the whole head dim, any permutation applied to both q and k leaves the attention scores unchanged.
    v, o and the FFN are not rotated, so they are not permuted. (HF's own Meta -> HF converter does the same.)"""
    rows, C = w.shape
    D = rows // num_heads
    # (H·D, C) -> (H, D/2, 2, C): head, pair k, member p of the pair -> (H, 2, D/2, C): all first members, then all
    # second members -> (H·D, C)
    return w.reshape(num_heads, D // 2, 2, C).transpose(1, 2).reshape(rows, C)


def rope_halves_to_pairs(w: Tensor, num_heads: int) -> Tensor:
    """The inverse of rope_pairs_to_halves: HF's rotate-half rows (H·D, C) back to our adjacent pairs."""
    rows, C = w.shape
    D = rows // num_heads
    return w.reshape(num_heads, 2, D // 2, C).transpose(1, 2).reshape(rows, C)  # (H, 2, D/2, C) -> (H, D/2, 2, C)


def to_hf_llama_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_id: int | None) -> dict:
    """The config.json of a LlamaForCausalLM that computes what TransformerLM(cfg) does; an ablation Llama cannot
    express is a BadInputError naming the field. Written in the keys both transformers 4.x and 5.x read."""
    for field, (want, meaning) in HF_LLAMA_FIXED.items():
        if getattr(cfg, field) != want:
            raise BadInputError(f"cannot export {field}={getattr(cfg, field)!r}: Hugging Face Llama always has "
                                f"{meaning} ({field}={want!r}); this ablation has no LlamaConfig equivalent")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_heads,  # no grouped-query attention
            "head_dim": cfg.d_model // cfg.num_heads, "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length, "rms_norm_eps": RMS_NORM_EPS,
            "rope_theta": float(cfg.rope_theta), "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "torch_dtype": "float32", "use_cache": True}


def from_hf_llama_config(hf: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama config.json (`where` names it in errors); what TransformerLM cannot
    represent (grouped-query attention, biases, rope scaling, another activation or eps) is a BadInputError."""
    check_hf_llama_config(hf, where)
    get = hf.get
    if get("model_type") != "llama":
        raise BadInputError(f"{where}: model_type {hf['model_type']!r} is not 'llama'; only LlamaForCausalLM "
                            f"directories can be imported")
    heads, d_model = get("num_attention_heads"), get("hidden_size")
    if d_model % heads:
        raise BadInputError(f"{where}: hidden_size {d_model} is not divisible by num_attention_heads {heads}")
    kv_heads, head_dim = get("num_key_value_heads", heads), get("head_dim", None)
    theta = _hf_rope_theta(hf, where)
    problems = [(kv_heads != heads, f"grouped-query attention (num_key_value_heads {kv_heads} < "
                 f"num_attention_heads {heads}): model.py's attention has one key/value head per query head"),
                (get("attention_bias", False), "attention_bias is true: model.py's Linear layers have no biases"),
                (get("mlp_bias", False), "mlp_bias is true: model.py's Linear layers have no biases"),
                (get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} is not silu (SwiGLU)"),
                (head_dim not in (None, d_model // heads), f"head_dim {head_dim} is not hidden_size / "
                 f"num_attention_heads = {d_model // heads}, the only head size model.py has"),
                (get("rms_norm_eps", RMS_NORM_EPS) != RMS_NORM_EPS, f"rms_norm_eps {hf.get('rms_norm_eps')} differs "
                 f"from model.py's RMSNorm eps {RMS_NORM_EPS}")]
    for bad, why in problems:
        if bad:
            raise BadInputError(f"{where}: {why}")
    try:
        return ModelConfig(vocab_size=get("vocab_size"), context_length=get("max_position_embeddings"),
                           d_model=d_model, num_layers=get("num_hidden_layers"), num_heads=heads,
                           d_ff=get("intermediate_size"), rope_theta=theta,
                           tie_embeddings=get("tie_word_embeddings", False)).validate()
    except ValueError as e:
        raise BadInputError(f"{where}: {e}") from None


# Every config.json field from_hf_llama_config reads, and what it must be: checked first, so a damaged or hand-edited
# file is one line naming the field (not a TypeError or ZeroDivisionError from deep inside the conversion). JSON's
# true/false are not integers here, "2" is not 2, and 0 heads or layers is meaningless. The first group is required.
POSITIVE_INT, POSITIVE_NUMBER = "an integer >= 1", "a positive number"
HF_CONFIG_REQUIRED = {"model_type": "a string", "vocab_size": POSITIVE_INT, "hidden_size": POSITIVE_INT,
                      "intermediate_size": POSITIVE_INT, "num_hidden_layers": POSITIVE_INT,
                      "num_attention_heads": POSITIVE_INT, "max_position_embeddings": POSITIVE_INT}
HF_CONFIG_OPTIONAL = {"num_key_value_heads": POSITIVE_INT, "head_dim": POSITIVE_INT + " or null",
                      "rope_theta": POSITIVE_NUMBER, "rms_norm_eps": POSITIVE_NUMBER,
                      "rope_scaling": "null or an object", "rope_parameters": "null or an object",
                      "tie_word_embeddings": "true or false", "attention_bias": "true or false",
                      "mlp_bias": "true or false", "hidden_act": "a string"}
HF_CONFIG_TESTS = {"a string": lambda v: isinstance(v, str),
                   POSITIVE_INT: lambda v: is_int(v, 1),
                   POSITIVE_INT + " or null": lambda v: v is None or is_int(v, 1),
                   POSITIVE_NUMBER: lambda v: is_int(v, 1) or isinstance(v, float) and 0 < v < float("inf"),
                   "null or an object": lambda v: v is None or isinstance(v, dict),
                   "true or false": lambda v: isinstance(v, bool)}


def check_hf_llama_config(hf, where: str) -> None:
    """BadInputError naming the first field of a config.json (parsed) that is missing or of the wrong type or range."""
    if not isinstance(hf, dict):
        raise BadInputError(f"{where} holds {json_shown(hf)}, not a JSON object: is it a Hugging Face config.json?")
    for key in HF_CONFIG_REQUIRED:
        if key not in hf:
            raise BadInputError(f"{where} has no {key!r}: is it a Hugging Face Llama config.json?")
    fields = {**HF_CONFIG_REQUIRED, **{k: v for k, v in HF_CONFIG_OPTIONAL.items() if k in hf}}
    for key, expected in fields.items():
        if not HF_CONFIG_TESTS[expected](hf[key]):
            raise BadInputError(field_problem(where, key, expected, hf[key]))
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", MISSING)  # where transformers 5.x keeps rope_theta
    if theta is not MISSING and not HF_CONFIG_TESTS[POSITIVE_NUMBER](theta):
        raise BadInputError(field_problem(where, "rope_parameters.rope_theta", POSITIVE_NUMBER, theta))


HF_DEFAULT_ROPE_THETA = 10_000.0  # LlamaConfig's default when config.json names none


def _hf_rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 4.x keys (rope_theta, rope_scaling) or 5.x's (rope_parameters); any scaling
    (linear, dynamic, yarn, llama3, ...) is refused: our RoPE has only theta."""
    scaling, params = hf.get("rope_scaling") or {}, hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else params.get("rope_type", "default")
    if kind not in (None, "default"):
        raise BadInputError(f"{where}: rope scaling {kind!r} ({scaling or params}): model.py's RoPE has no scaling, "
                            f"only rope_theta")
    return float(hf.get("rope_theta", params.get("rope_theta", HF_DEFAULT_ROPE_THETA)))


def to_hf_llama_state_dict(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> LlamaForCausalLM's: renamed, q/k rows permuted per head, a tied lm_head left out."""
    to_hf_llama_config(cfg, None, None)  # refuses the ablations HF cannot express
    out = {}
    for ours, hf in hf_llama_names(cfg):
        w = state_dict[ours]
        if ours.endswith(ROPE_PROJECTIONS):
            w = rope_pairs_to_halves(w, cfg.num_heads)
        out[hf] = w.contiguous()  # note: safetensors stores contiguous tensors only
    return out


def from_hf_llama_state_dict(cfg: ModelConfig, tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """LlamaForCausalLM's tensors -> a state dict for TransformerLM(cfg), in fp32 (bf16/fp16 convert exactly).
    Biases, unknown or missing tensors and wrong shapes are a BadInputError naming the first one."""
    biases = sorted(k for k in tensors if k.endswith(".bias"))
    if biases:
        raise BadInputError(f"{where}: {biases[0]} is a bias ({len(biases)} bias tensors): model.py's Linear layers "
                            f"have none")
    names = hf_llama_names(cfg)
    known = {hf for _, hf in names} | {HF_LLAMA_NAMES["lm_head.weight"]}  # a tied lm_head may be stored anyway
    unknown = sorted(k for k in tensors if k not in known and not k.endswith("rotary_emb.inv_freq"))  # a buffer
    if unknown:
        raise BadInputError(f"{where}: unexpected tensor {unknown[0]!r} ({len(unknown)} in all): not a "
                            f"LlamaForCausalLM with this config.json")
    shapes = {k: v.shape for k, v in TransformerLM(**dataclasses.asdict(cfg), device="meta").state_dict().items()}
    out = {}
    for ours, hf in names:
        if hf not in tensors:
            raise BadInputError(f"{where}: tensor {hf!r} is missing")
        if tensors[hf].shape != shapes[ours]:
            raise BadInputError(f"{where}: {hf} has shape {tuple(tensors[hf].shape)}, config.json implies "
                                f"{tuple(shapes[ours])}")
        w = tensors[hf].to(torch.float32)
        out[ours] = rope_halves_to_pairs(w, cfg.num_heads) if ours.endswith(ROPE_PROJECTIONS) else w
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["token_embeddings.weight"]  # one tensor under both keys, as state_dict() has
    return out
