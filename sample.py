"""
Sample images from a checkpoint: the deterministic EDM sampler (Karras et al. 2022, Algorithm 2:
Heun's 2nd-order method on the Karras schedule) with classifier-free guidance.

    python sample.py --ckpt out/default --prompt "a red circle on the left" --n 8
    python sample.py --ckpt out/default --prompts-file captions.txt --out out/samples

Each image has its own seed (seed + its index), so an image does not change with the batch size.
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from checkpoint import load_pretrained, resolve_checkpoint
from encoders import PIXELS, latents_to_images, load_encoders


@torch.no_grad()
def edm_sampler(D, y, seeds, steps=30, guidance=5.0, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Draw one latent per (caption features, seed) with the denoiser D (diffusion.Denoiser).
    y (B, L, Dy) -> latents (B, C, H, W) in float32."""
    cfg, device = D.net.cfg, y.device
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    # the initial noise of each image comes from its own generator: batch-size independent
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)),
                                     dtype=torch.float64) for s in seeds]).to(device)
    # Karras schedule (EDM Eq. 5): sigma_max -> sigma_min in steps, then 0
    i = torch.arange(steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho)
         + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])

    def denoise(x, sigma):
        # conditional and unconditional (all-zero caption) passes in one batch; guidance on the output
        s = torch.full((x.shape[0],), float(sigma), device=device)
        if guidance == 1.0:
            return D(x.float(), s, y)[0].double()
        D_x, _ = D(torch.cat([x, x]).float(), torch.cat([s, s]), torch.cat([y, torch.zeros_like(y)]))
        cond, uncond = D_x.double().chunk(2)
        return uncond + guidance * (cond - uncond)

    x = noise * t[0]  # the ODE state stays in float64 (SPEC A3)
    for k in range(steps):  # Algorithm 2 with S_churn = 0: Euler step, then Heun's correction
        d = (x - denoise(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if t[k + 1] > 0:
            d2 = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (d + d2) / 2
        x = x_next
    return x.float()


def image_grid(images, cols=None):
    """Tile uint8 (H, W, 3) images into one PIL image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(grid)


def generate(D, config, prompts, seed=0, steps=30, guidance=5.0, batch_size=32, progress=True, encoders=None):
    """Images (uint8 arrays) for a list of prompts, the i-th with seed + i, from the denoiser D. encoders:
    (text encoder, VAE) from encoders.load_encoders, to load them once for many calls."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty")
    device = next(D.parameters()).device
    encode, vae = encoders or load_encoders(config, device)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        chunk = prompts[start:start + batch_size]
        y = encode(chunk).to(device)
        x = edm_sampler(D, y, range(seed + start, seed + start + len(chunk)), steps, guidance)
        images += latents_to_images(x, config.get("latents", PIXELS), vae)
    return images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="out/default",
                    help="a checkpoint folder, a training output folder (its newest checkpoint), a Hub "
                    "repo id user/name, or a released .pt (local or user/name/path/file.pt)")
    ap.add_argument("--official-preset", default="MicroDiT_XL_2",
                    help="the preset a released .pt file is built as")
    ap.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    ap.add_argument("--prompts-file", help="a text file with one caption per line")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--steps", type=int, default=30, help="Heun steps (2 network calls each, 1 for the last)")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="out/samples", help="folder for the PNGs and grid.png")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights exist")
    ap.add_argument("--text-encoder",
                    help="repo id or folder of the text encoder, instead of the checkpoint's")
    ap.add_argument("--vae", help="repo id or folder of the VAE, instead of the checkpoint's")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    try:
        ckpt = resolve_checkpoint(args.ckpt)
    except FileNotFoundError as e:
        ap.error(f"{e}; train one with `python train.py`, or give a Hub repo id")
    D, config = load_pretrained(ckpt, ema=not args.no_ema, device=args.device,
                                official_preset=args.official_preset)
    for key, repo in (("text_encoder", args.text_encoder), ("latents", args.vae)):
        if repo:  # e.g. a local copy of the encoders on a machine without network
            config[key] = {**config[key], "repo": os.path.abspath(repo) if os.path.isdir(repo) else repo}
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:  # default: the held-out captions the checkpoint was evaluated on
        prompts = config.get("eval_prompts", [])[:16]
        if not prompts:
            ap.error("give --prompt or --prompts-file")
    prompts = [p for p in prompts for _ in range(args.n)]
    try:
        images = generate(D, config, prompts, args.seed, args.steps, args.guidance, args.batch_size)
    except ValueError as e:  # an empty prompt, a caption the text encoder cannot read
        ap.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(args.out, f"{i:06d}.png"))
    with open(os.path.join(args.out, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    if len(images) <= 256:  # a grid to look at; not for large runs, whose folder fid.py reads as samples
        image_grid(images).save(os.path.join(args.out, "grid.png"))
    print(f"{len(images)} images from {ckpt} -> {args.out}/ (000000.png ..., prompts.txt"
          f"{', grid.png' if len(images) <= 256 else ''})")


if __name__ == "__main__":
    main()
