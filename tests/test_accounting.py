"""accounting.py: the analytic counts against hand-derived closed forms and the handout's GPT-2 XL figures, the
MFU formula train.py uses (train_flops_per_token), and the measured torch.mm peak."""
import math
import time
from types import SimpleNamespace

import torch

import accounting

# GPT-2 XL as the handout's transformer_accounting problem gives it (field names as in model.ModelConfig).
XL = SimpleNamespace(vocab_size=50257, context_length=1024, d_model=1600, num_layers=48, num_heads=25, d_ff=6400,
                     rope_theta=10000.0, norm="pre", position="rope", ffn="swiglu", tie_embeddings=False)


def test_gpt2_xl_headline_counts():
    assert accounting.count_params(XL) == 2_127_057_600
    assert accounting.forward_flops(XL, batch_size=1, seq_len=1024) == 4_513_336_524_800


def test_train_flops_per_token_is_6n_plus_attention():
    # 6·N_matmul + 12·L·T·d: N_matmul excludes the embedding gather and the norm gains, includes lm_head.
    for cfg, T in [(XL, 1024), (XL, 17), (SimpleNamespace(**{**vars(XL), "ffn": "silu", "d_ff": 64,
                                                             "tie_embeddings": True, "norm": "none"}), 8)]:
        n_ffn = 3 if cfg.ffn == "swiglu" else 2
        n_matmul = cfg.num_layers * (4 * cfg.d_model**2 + n_ffn * cfg.d_model * cfg.d_ff) + cfg.vocab_size * cfg.d_model
        expected = 6 * n_matmul + 12 * cfg.num_layers * T * cfg.d_model
        assert accounting.train_flops_per_token(cfg, seq_len=T) == expected
    assert accounting.train_flops_per_token(XL) == accounting.train_flops_per_token(XL, 1024)


def test_measure_matmul_flops_is_a_peak():
    n = 256
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    torch.mm(a, b)
    one_call = 2 * n**3 / (time.perf_counter() - t0)
    peak = accounting.measure_matmul_flops(n=n, seconds=0.2)
    assert math.isfinite(peak) and 1e8 < peak < 1e14
    assert peak >= 0.5 * one_call  # the best of many repeats is at least about as fast as one timed call
