"""A tiny masked-token transformer (MaskGIT, Chang et al. 2022) on this pipeline's VQ token shards.

Training: each batch of tokens [B, h, w] gets a share of its positions replaced by a [MASK] token,
the share drawn from MaskGIT's cosine schedule, and a bidirectional transformer predicts the codes
under the masks (cross-entropy on the masked positions only). Sampling: from all-[MASK], a few
steps each fill in the most confident predictions and re-mask the rest, following the same
schedule; the sampled tokens are decoded by the exported VQModel into a grid.

    python examples/maskgit_tokens.py --latents data/latents --vae data/vae --steps 2000 --out grid.png

What it relies on from ldm_vae: ``token_loader`` (token batches with the loader's DDP and epoch
guarantees) and ``decode_tokens``. The last line printed is a JSON report.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from PIL import Image
from torch import nn

from ldm_vae import decode_tokens, token_loader


class MaskedTokenModel(nn.Module):
    """Codes 0..K-1 plus [MASK] = K -> logits over the K codes at every position."""

    def __init__(self, k: int, positions: int, dim: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.k = k
        self.embed = nn.Embedding(k + 1, dim)
        self.pos = nn.Parameter(torch.randn(positions, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, k)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, N] long -> logits [B, N, K]
        return self.head(self.body(self.embed(tokens) + self.pos[: tokens.shape[1]]))


def mask_share(u: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule: the share of positions masked at ``u`` in [0, 1]."""
    return torch.cos(u * math.pi / 2)


def train_step(model, opt, tokens: torch.Tensor) -> float:
    b, n = tokens.shape  # flattened [B, h w]
    share = mask_share(torch.rand(b, 1))  # [B, 1]
    masked = torch.rand(b, n) < share.clamp_min(1.0 / n)  # [B, N], at least one on average
    masked[torch.arange(b), torch.randint(n, (b,))] = True  # and surely one
    logits = model(torch.where(masked, model.k, tokens))
    loss = nn.functional.cross_entropy(logits[masked], tokens[masked])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


@torch.no_grad()
def sample(model, n: int, positions: int, steps: int = 8, temperature: float = 1.0) -> torch.Tensor:
    """[n, positions] codes: from all-[MASK], each step keeps the most confident sampled codes."""
    tokens = torch.full((n, positions), model.k)
    for s in range(steps):
        logits = model(tokens) / temperature
        probs = logits.softmax(-1)
        drawn = torch.multinomial(probs.view(-1, model.k), 1).view(n, positions)
        conf = probs.gather(-1, drawn[..., None])[..., 0]
        unknown = tokens == model.k
        conf = torch.where(unknown, conf, torch.inf)  # what is fixed stays
        keep_masked = int(positions * float(mask_share(torch.tensor((s + 1) / steps))))
        tokens = torch.where(unknown, drawn, tokens)
        if keep_masked:
            lowest = conf.topk(keep_masked, dim=1, largest=False).indices
            tokens.scatter_(1, lowest, model.k)
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=Path, default=Path("data/latents"))
    ap.add_argument("--vae", type=Path, default=Path("data/vae"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("maskgit_grid.png"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    stats = json.loads((args.latents / "stats.json").read_text())
    if stats.get("regularizer") != "vq":
        raise SystemExit(f"{args.latents}: KL latents, not tokens: train with model.regularizer: vq")
    k = stats["codebook_size"]
    if stats["latent_shape"] is None:  # one position embedding per token: one grid size
        raise SystemExit(f"{args.latents}: tokens of {len(stats['latent_shapes'])} shapes (buckets); this example "
                         "takes square crops of one size")
    _, h, w = stats["latent_shape"]
    loader = token_loader(str(args.latents / "train" / "*.tar"), batch_size=args.batch_size, num_workers=0,
                          drop_last=False, stats=args.latents / "stats.json")
    model = MaskedTokenModel(k, h * w)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    losses, epoch = [], 0
    while len(losses) < args.steps:
        loader.set_epoch(epoch)
        for batch in loader:
            losses.append(train_step(model, opt, batch["tokens"].flatten(1)))
            if len(losses) == args.steps:
                break
        epoch += 1
    model.eval()
    tokens = sample(model, args.samples, h * w).view(args.samples, h, w)
    images = decode_tokens(VQModel.from_pretrained(args.vae).eval(), tokens)  # [n, 3, 8h, 8w] in [0, 1]
    grid = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [n, H, W, 3]
    Image.fromarray(np.concatenate(list(grid), axis=1)).save(args.out)
    head = max(1, min(5, len(losses) // 4))
    print(json.dumps({"steps": len(losses), "loss_first": float(np.mean(losses[:head])),
                      "loss_last": float(np.mean(losses[-head:])), "uniform_loss": math.log(k), "grid": str(args.out)}))


if __name__ == "__main__":
    main()
