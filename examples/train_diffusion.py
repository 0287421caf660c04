"""A small, complete latent diffusion trainer on this pipeline's latent shards: unconditional,
class-conditional or text-conditional, on square latents or on aspect-ratio buckets.

It trains a diffusers UNet to predict the noise of DDPM on the stored latents, on one process or
many (DDP through accelerate), then samples a grid per bucket (a row per class or per caption) and
decodes it with the exported VAE.

    python examples/train_diffusion.py --steps 2000                      # unconditional
    python examples/train_diffusion.py --class-cond ...                  # labels (data.labels: folder)
    python examples/train_diffusion.py --text-cond --size-cond ...       # captions + buckets, SDXL-style
    accelerate launch --num_processes 8 examples/train_diffusion.py ...  # DDP, one process a GPU

- ``--class-cond``: a class embedding added to the timestep embedding (DiT's and ADM's way), the
  classes from the latents' classes.json (``data.labels``).
- ``--text-cond``: a ``UNet2DConditionModel`` whose cross-attention reads the caption's token
  states, from a small byte-level text encoder trained jointly (examples/text_encoder.py; swap in
  CLIP or T5 where a hub is reachable). Captions are dropped 10% of the time, and sampling uses
  classifier-free guidance.
- ``--size-cond`` (latents prepared with ``data.crop: bucket``): SDXL's micro-conditioning, the six
  numbers original_size, crop_top_left and target_size, each a sinusoidal embedding; with text, as
  SDXL adds them (``addition_embed_type: text_time``, beside the pooled caption).

What it is not: a recipe for a good model (no EMA, no learning-rate schedule, a small UNet). What
it relies on from ldm_vae: ``latent_loader`` (every rank the same number of full batches per epoch,
one shape a batch; ``set_epoch`` reshuffles) and ``decode_latents`` (undoes the loader's
normalisation, then the VAE decodes). Everything else is plain torch, diffusers and accelerate.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from PIL import Image
from text_encoder import ByteTextEncoder

from ldm_vae import decode_latents, latent_loader
from ldm_vae.samples import LATENT
from ldm_vae.shards import iter_samples, shard_paths

SIZE_DIM = 256  # sinusoid channels per size number (SDXL's addition_time_embed_dim)


@dataclass
class Cond:
    """What a batch is conditioned on (None: that kind of conditioning is off)."""
    labels: torch.Tensor | None = None  # [B] int64 class indices
    captions: list[str] | None = None
    time_ids: torch.Tensor | None = None  # [B, 6] float: original_size, crop_top_left, target_size


class Denoiser(torch.nn.Module):
    """eps(z_t, t | cond). Without text: a UNet2DModel, the size and class embeddings added to
    its timestep embedding. With text: a UNet2DConditionModel with cross-attention on the text
    encoder's states, its class embedding, and SDXL's text_time embedding for sizes."""

    def __init__(self, channels: int, size: int, widths: list[int], classes: int, size_cond: bool,
                 text: ByteTextEncoder | None):
        super().__init__()
        n = len(widths)
        self.text, self.size_cond = text, size_cond
        common = dict(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                      layers_per_block=2, norm_num_groups=min(32, widths[0]))
        if text is not None:
            self.unet = UNet2DConditionModel(
                **common, down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), cross_attention_dim=text.dim,
                attention_head_dim=8, num_class_embeds=classes or None,
                addition_embed_type="text_time" if size_cond else None,
                addition_time_embed_dim=SIZE_DIM if size_cond else None,
                projection_class_embeddings_input_dim=text.dim + 6 * SIZE_DIM if size_cond else None)
            return
        extra = size_cond or classes > 0
        self.unet = UNet2DModel(**common, down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                                up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
                                class_embed_type="identity" if extra else None)
        dim = self.unet.time_embedding.linear_2.out_features
        self.size_proj = Timesteps(SIZE_DIM, flip_sin_to_cos=True, downscale_freq_shift=0) if size_cond else None
        self.size_embed = TimestepEmbedding(6 * SIZE_DIM, dim) if size_cond else None
        self.class_embed = torch.nn.Embedding(classes, dim) if classes else None

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """z [B, C, h, w], t [B] -> predicted noise [B, C, h, w]."""
        if self.text is not None:
            states = self.text(cond.captions)
            added = None
            if self.size_cond:  # SDXL: the pooled caption beside the six size numbers
                added = {"text_embeds": states.pooled, "time_ids": cond.time_ids}
            return self.unet(z, t, encoder_hidden_states=states.hidden, encoder_attention_mask=states.mask,
                             class_labels=cond.labels, added_cond_kwargs=added).sample
        emb = None
        if self.size_embed is not None:  # [B, 6] -> [B, 6 * 256] -> [B, dim]
            emb = self.size_embed(self.size_proj(cond.time_ids.flatten()).reshape(len(z), -1).to(z.dtype))
        if self.class_embed is not None:
            emb = self.class_embed(cond.labels) if emb is None else emb + self.class_embed(cond.labels)
        return self.unet(z, t, class_labels=emb).sample


def batch_cond(batch: dict, args, device, train: bool) -> Cond:
    captions = None
    if args.text_cond:  # caption dropout: what classifier-free guidance samples against
        drop = (
            np.random.random(len(batch["caption"])) < args.caption_dropout if train else [False] * len(batch["caption"])
        )
        captions = ["" if d else (c or "") for c, d in zip(batch["caption"], drop)]
    return Cond(labels=batch["label"].to(device) if args.class_cond else None, captions=captions,
                time_ids=batch["time_ids"].float().to(device) if args.size_cond else None)


@torch.no_grad()
def sample(model: Denoiser, scheduler: DDPMScheduler, n: int, shape: list[int], cond: Cond, steps: int, seed: int,
           guidance: float) -> torch.Tensor:
    """n latents [n, C, h, w] in the loader's normalisation, by ``steps`` DDPM steps; with
    captions and ``guidance`` != 1, classifier-free guidance against the empty caption."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    z = torch.randn((n, *shape), generator=g).to(device)
    guided = cond.captions is not None and guidance != 1.0
    empty = Cond(cond.labels, [""] * n, cond.time_ids)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps = model(z, t, cond)
        if guided:
            eps_empty = model(z, t, empty)
            eps = eps_empty + guidance * (eps - eps_empty)
        z = scheduler.step(eps, t, z, generator=g).prev_sample
    return z


def save_image_grid(images: torch.Tensor, path: Path, cols: int | None = None) -> None:
    """[N, 3, H, W] in [0, 1] -> one PNG, ``cols`` a row (default: as square as N allows)."""
    n, _, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    Image.fromarray(grid).save(path)


def train_loop(accelerator, model, opt, scheduler: DDPMScheduler, loader, args) -> list[float]:
    """``args.steps`` optimizer steps of epsilon prediction, epoch by epoch; the loss of each (mean over ranks)."""
    step, epoch, losses = 0, 0, []
    while step < args.steps:
        loader.set_epoch(epoch)  # a new order, the same on every rank
        before = step
        for batch in loader:
            z0 = batch["latent"].to(accelerator.device)  # [B, C, h, w], ~N(0, 1) per channel
            noise = torch.randn_like(z0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
            pred = model(scheduler.add_noise(z0, noise, t), t, batch_cond(batch, args, z0.device, train=True))
            loss = torch.nn.functional.mse_loss(pred, noise)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            step += 1
            if accelerator.is_main_process and (step % 50 == 0 or step == args.steps):
                print(f"step {step}: loss {np.mean(losses[-50:]):.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1
        if step == before:
            raise SystemExit("the loader gave no full batch: fewer latents per process, loader worker and bucket "
                             "than --batch-size; lower it or --num-workers")
    return losses


def sample_rows(args, stats: dict) -> list[tuple[str, dict]]:
    """The rows of each sample grid: (what it shows, its condition): one per class (at most 8),
    per caption (the first --sample-captions of the validation latents), or one unconditional."""
    if args.class_cond:
        names_file = args.latents / "classes.json"
        names = json.loads(names_file.read_text()) if names_file.is_file() else []
        return [(names[i] if i < len(names) else f"class {i}", {"label": i})
                for i in range(min(8, num_classes(args, stats)))]
    if args.text_cond:
        captions: list[str] = []
        for split in ("val", "train"):
            for s in iter_samples(shard_paths(args.latents / split)):
                caption = LATENT.get(s, "caption")
                if caption and caption not in captions:
                    captions.append(caption)
                if len(captions) == args.sample_captions:
                    return [(c, {"caption": c}) for c in captions]
        return [(c, {"caption": c}) for c in captions] or [("(no caption)", {"caption": ""})]
    return [("unconditional", {})]


def num_classes(args, stats: dict) -> int:
    if stats.get("num_classes"):
        return stats["num_classes"]
    labels = [int(k) for k in stats["splits"]["train"].get("labels", {}) if k.lstrip("-").isdigit()]
    if not labels or min(labels) < 0:
        raise SystemExit(f"--class-cond: {args.latents} has no integer labels (prepare the data with data.labels: "
                         "folder, or an hf/urls label column of class indices)")
    return max(labels) + 1


def write_samples(accelerator, model: Denoiser, scheduler, args, stats: dict, shapes: list[list[int]]) -> list[dict]:
    """A grid per bucket (the --sample-buckets most common shapes): a row per class or caption,
    --samples columns; samples.png is the first; samples.json says what each row shows."""
    vae = AutoencoderKL.from_pretrained(args.vae)
    rows = sample_rows(args, stats)
    grids = []
    for b, (channels, h, w) in enumerate(shapes[: args.sample_buckets]):
        n = len(rows) * args.samples
        picks = [cond for _, cond in rows for _ in range(args.samples)]
        device = accelerator.device
        cond = Cond(
            labels=torch.tensor([c["label"] for c in picks], device=device) if args.class_cond else None,
            captions=[c["caption"] for c in picks] if args.text_cond else None,
            # SDXL's neutral size ids: uncropped, at the bucket's own size.
            time_ids=torch.tensor([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w]] * n, dtype=torch.float, device=device)
            if args.size_cond else None)
        z = sample(model, scheduler, n, [channels, h, w], cond, args.sample_steps, args.seed + b, args.guidance)
        images = decode_latents(vae, z.cpu(), "channel", args.latents / "stats.json")  # [N, 3, 8h, 8w] in [0, 1]
        name = f"samples-{8 * w}x{8 * h}.png"
        save_image_grid(images, args.out / name, cols=args.samples)
        grids.append({"file": name, "latent_shape": [channels, h, w], "rows": [r for r, _ in rows]})
    (args.out / "samples.png").write_bytes((args.out / grids[0]["file"]).read_bytes())
    (args.out / "samples.json").write_text(json.dumps({"grids": grids}, indent=2) + "\n")
    return grids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=Path, default=Path("data/latents"), help="the encode stage's output")
    ap.add_argument("--vae", type=Path, default=Path("data/vae"), help="the exported VAE (for the sample grid)")
    ap.add_argument("--out", type=Path, default=Path("diffusion-run"))
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="UNet block widths")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=4, help="samples per grid row")
    ap.add_argument("--sample-buckets", type=int, default=3, help="grids for this many shapes, most common first")
    ap.add_argument("--sample-captions", type=int, default=4, help="--text-cond: grid rows, one caption each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--class-cond", action="store_true", help="condition on the shards' class labels")
    ap.add_argument("--text-cond", action="store_true", help="condition on the captions (cross-attention)")
    ap.add_argument("--text-dim", type=int, default=128, help="--text-cond: the text encoder's width")
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="--text-cond: share of empty captions")
    ap.add_argument("--guidance", type=float, default=3.0, help="--text-cond: classifier-free guidance scale")
    ap.add_argument("--size-cond", action="store_true",
                    help="SDXL size conditioning (for bucketed latents: batches of several shapes)")
    args = ap.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed + accelerator.process_index)  # caption dropout: a draw of its own per rank
    stats = json.loads((args.latents / "stats.json").read_text())
    # latent_shapes: every [C, h, w] with its count, most common first (one for squares, one per bucket).
    shapes = [s["shape"] for s in stats["latent_shapes"]]
    if len(shapes) > 1 and not args.size_cond:
        print(f"note: {len(shapes)} latent shapes (buckets) and no --size-cond: the model is not told each "
              "image's size and crop", flush=True)
    loader = latent_loader(str(args.latents / "train" / "*.tar"), stats=args.latents / "stats.json",
                           batch_size=args.batch_size, num_workers=args.num_workers, drop_last=True,
                           normalize="channel", sample_posterior=True, flip=True, seed=args.seed)
    classes = num_classes(args, stats) if args.class_cond else 0
    text = ByteTextEncoder(args.text_dim) if args.text_cond else None
    channels, h, _ = shapes[0]
    model = Denoiser(channels, h, args.widths, classes, args.size_cond, text)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model, opt = accelerator.prepare(model, opt)  # DDP; the loader splits the data by rank itself
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    losses = train_loop(accelerator, model, opt, scheduler, loader, args)
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        net = accelerator.unwrap_model(model).eval()
        grids = write_samples(accelerator, net, scheduler, args, stats, shapes)
        net.unet.save_pretrained(args.out / "unet")
        rest = {k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("unet.")}
        if rest:  # the text encoder, the size and class embeddings of the plain UNet
            from safetensors.torch import save_file

            save_file(rest, args.out / "conditioning.safetensors")
        (args.out / "loss.json").write_text(json.dumps({"step": list(range(1, len(losses) + 1)), "loss": losses}))
        print(f"wrote {', '.join(g['file'] for g in grids)} and the model to {args.out}", flush=True)


if __name__ == "__main__":
    main()
