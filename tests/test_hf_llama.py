"""Tests for lib/hf_llama.py, model.py <-> transformers' LlamaForCausalLM, on the mapping itself (train.py's
export / import commands around it are tested in tests/test_hf.py): the state dict round-trips bit for bit, the
RoPE row permutation and its inverse, the config's refusals, and (with transformers installed) the converted
weights give our logits in transformers' own model.

    python -m pytest tests/test_hf_llama.py
"""
import dataclasses

import pytest
import torch

from lib.cli import BadInputError
from lib.hf_llama import (from_hf_llama_config, from_hf_llama_state_dict, rope_halves_to_pairs, rope_pairs_to_halves,
                          to_hf_llama_config, to_hf_llama_state_dict)
from model import ModelConfig, TransformerLM

CFG = ModelConfig(vocab_size=97, context_length=32, d_model=32, num_layers=2, num_heads=4, d_ff=48)


def test_rope_permutation_and_its_inverse():
    w = torch.arange(8 * 3).reshape(8, 3).float()  # two heads of D = 4, C = 3
    halves = rope_pairs_to_halves(w, num_heads=2)
    assert halves[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]  # per head rows 0, 2, then 1, 3
    assert torch.equal(rope_halves_to_pairs(halves, num_heads=2), w)


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_round_trips_bit_for_bit(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    torch.manual_seed(0)
    ours = TransformerLM(**dataclasses.asdict(cfg)).state_dict()
    hf = to_hf_llama_state_dict(cfg, ours)
    assert ("lm_head.weight" in hf) == (not tie)  # HF ties a tied head to model.embed_tokens.weight
    back = from_hf_llama_state_dict(cfg, hf, "test")
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert from_hf_llama_config(to_hf_llama_config(cfg, 0, 0), "test") == cfg


def test_ablations_hf_llama_cannot_express_are_refused():
    for field, value in (("norm", "post"), ("position", "nope"), ("ffn", "silu")):
        with pytest.raises(BadInputError, match=f"cannot export {field}="):
            to_hf_llama_config(dataclasses.replace(CFG, **{field: value}), None, None)
    hf = to_hf_llama_config(CFG, None, None)
    with pytest.raises(BadInputError, match="grouped-query attention"):
        from_hf_llama_config({**hf, "num_key_value_heads": 2}, "config.json")


@pytest.mark.parametrize("fast", [False, True])
def test_converted_weights_give_our_logits_in_transformers(fast):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = TransformerLM(**dataclasses.asdict(CFG), fast=fast)
    config = transformers.LlamaConfig(**{k: v for k, v in to_hf_llama_config(CFG, 0, 0).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = transformers.LlamaForCausalLM(config).eval()
    result = theirs.load_state_dict(to_hf_llama_state_dict(CFG, ours.state_dict()), strict=False)
    assert not result.unexpected_keys and all("rotary_emb" in k for k in result.missing_keys)  # buffers only
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
