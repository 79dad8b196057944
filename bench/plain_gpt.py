"""A plain PyTorch GPT: the reference model of bench/bench_small.py, NOT part of the teaching code.

What a PyTorch user would write without this repository, GPT-2 style (Radford et al. 2019) as nanoGPT does: token +
learned position embeddings, pre-norm blocks of nn.LayerNorm -> causal self-attention through
F.scaled_dot_product_attention(is_causal=True) -> nn.LayerNorm -> a 4x GELU MLP, a final nn.LayerNorm and an untied
lm_head. Linear layers have no biases (as model.py's); LayerNorm keeps its default gain and bias. Trained with
F.cross_entropy and torch.optim.AdamW at their defaults. It exists only so that the benchmark can say how much our
from-scratch step costs beyond a plain one of the same size.

    python bench/bench_small.py              # our TransformerLM step vs this model's step, alternated
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """x + Attn(LN(x)), then + MLP(LN(·)): (B, T, C) -> (B, T, C)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # q, k, v in one matmul, as nanoGPT's c_attn
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc_out = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    """token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int):
        super().__init__()
        self.token_embeddings = nn.Embedding(vocab_size, d_model)
        self.position_embeddings = nn.Embedding(context_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads) for _ in range(num_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, token_ids: Tensor) -> Tensor:
        T = token_ids.shape[1]
        x = self.token_embeddings(token_ids) + self.position_embeddings(torch.arange(T, device=token_ids.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_final(x))
