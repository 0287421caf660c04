"""A small byte-level text encoder, trained jointly with the example's UNet (no hub is needed).

It stands where CLIP or T5 stands in Stable Diffusion: captions in, a sequence of token states
for the UNet's cross-attention and one pooled vector (SDXL's ``text_embeds``) out. It learns only
from this dataset's captions, so it knows the words the captions use and nothing else: enough to
show that the latents and their captions train a text-conditional model end to end, not a
substitute for a pretrained encoder. To use CLIP or T5 instead, replace :class:`ByteTextEncoder`
with a module of the same ``forward`` (docs/trainer.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BOS, PAD, VOCAB = 256, 257, 258  # byte values 0..255, then a start token (never masked) and padding


@dataclass
class TextStates:
    hidden: torch.Tensor  # [B, L, D] per token, for cross-attention
    pooled: torch.Tensor  # [B, D] one vector per caption (the start token's state)
    mask: torch.Tensor  # [B, L] 1 for real tokens, 0 for padding


class ByteTextEncoder(torch.nn.Module):
    """UTF-8 bytes -> a small pre-norm Transformer -> token states and a pooled vector."""

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 77):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.tokens = torch.nn.Embedding(VOCAB, dim)
        self.positions = torch.nn.Embedding(max_length, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """[B, L] int64: BOS, the caption's bytes (cut at max_length - 1), then PAD."""
        ids = torch.full((len(captions), self.max_length), PAD, dtype=torch.long)
        for i, caption in enumerate(captions):
            data = list((caption or "").encode("utf-8")[: self.max_length - 1])
            ids[i, 0] = BOS
            ids[i, 1: 1 + len(data)] = torch.tensor(data, dtype=torch.long)
        return ids

    def forward(self, captions: list[str]) -> TextStates:
        device = self.tokens.weight.device
        ids = self.tokenize(captions).to(device)  # [B, L]
        pad = ids == PAD  # [B, L]
        x = self.tokens(ids) + self.positions.weight[None, : ids.shape[1]]  # [B, L, D]
        x = self.norm(self.blocks(x, src_key_padding_mask=pad))  # [B, L, D]
        return TextStates(hidden=x, pooled=x[:, 0], mask=(~pad).to(x.dtype))
