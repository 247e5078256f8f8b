"""
What a training run costs and what it will reach.

Cost: training FLOPs from model.py's per-image counter x images seen, for any config and for the
whole four-stage MicroDiT recipe (the MicroDiT paper's training-recipe table, arXiv 2407.15811), turned
into GPU-hours and dollars (report.py); and the MFU that the paper's own figures imply ($1,890, 2.6 days
on 8 H100s, "Stretching Each Dollar", Sehwag et al. 2024).
Fits: power laws S = a X^b on the Pareto frontier ("On the Scalability of Diffusion-based
Text-to-Image Generation", Li et al. 2024, arXiv 2404.02883: "Paper B" below), the Chinchilla form
L(N, D) = E + A/N^alpha + B/D^beta fitted as in Hoffmann et al. 2022 (approach 3) and Besiroglu et al.
2024 (the Chinchilla replication), bootstrap intervals, and the compute-optimal split of a budget that
the fitted form implies.
The runs that these fits and tables read are made by experiments.py (the sweep and the ablations).

    python scaling.py cost [--preset MicroDiT_XL_2] [--gpu-peak 989.4] [--mfu 0.4] [--price 3.75]
    python scaling.py protocol-cost [--preset MicroDiT_XL_2] [--res 512] [--n 30000] [--steps 30]
    python scaling.py unets
    python scaling.py fit results.jsonl [--plot scaling.png]
"""
import argparse
import itertools
import os
from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import memory
from encoders import CLIP, AutoencoderKL, CLIPTextTransformer
from fid import InceptionV3
from model import (PRESETS, UNET_PRESETS, IFAttention, SpatialTransformer, UNet, flops_per_image, get_config,
                   param_count)
from report import (DEFAULT_MFU, H100_BF16_PEAK, PRICE_PER_GPU_HOUR, dollars, gpu_hours, pyplot, read_jsonl,
                    save_figure)

# -----------------------------------------------------------------------------
# compute and cost

# the GPU's peak, its price and the MFU assumed are report.py's (train.py prices every run with them)
PAPER_DAYS, PAPER_GPUS, PAPER_DOLLARS = 2.6, 8, 1890  # the paper's run: 2.6 days on an 8xH100 machine, $1,890

BATCH = 2048  # images per step, all four stages (the MicroDiT paper's training-recipe table)
RECIPE = [    # (stage, resolution in pixels, mask ratio, steps): that table; micro_diffusion/configs/*.yaml
    (1, 256, 0.75, 250_000),
    (2, 256, 0.0, 30_000),
    (3, 512, 0.75, 50_000),
    (4, 512, 0.0, 5_000),
]


def stage_config(cfg, res):
    """The config at a training resolution: SDXL VAE latents are res/8; 512px keeps 256px's position range."""
    return replace(cfg, latent_size=res // 8, pos_interp_scale=res / 256)


def recipe_stages(preset="MicroDiT_XL_2", batch=BATCH, recipe=RECIPE):
    """One dict per stage of the recipe: stage, res, mask_ratio, steps, images, flops_per_image, flops."""
    cfg = get_config(preset) if isinstance(preset, str) else preset
    stages = []
    for stage, res, mask_ratio, steps in recipe:
        f = flops_per_image(stage_config(cfg, res), mask_ratio, train=True)
        stages.append(dict(stage=stage, res=res, mask_ratio=mask_ratio, steps=steps, images=steps * batch,
                           flops_per_image=f, flops=f * steps * batch))
    return stages


def implied_mfu(flops, days=PAPER_DAYS, gpus=PAPER_GPUS, gpu_peak=H100_BF16_PEAK):
    """The MFU at which `flops` take `days` on `gpus` GPUs."""
    return flops / (days * 86400 * gpus * gpu_peak)


def print_cost(preset="MicroDiT_XL_2", gpu_peak=H100_BF16_PEAK, mfu=DEFAULT_MFU, price=PRICE_PER_GPU_HOUR):
    """The recipe's cost table, stage by stage, and the MFU the paper's figures imply."""
    stages = recipe_stages(preset)
    print(f"{preset}, batch {BATCH}, peak {gpu_peak / 1e12:.1f} TFLOP/s, MFU {mfu:.0%}, "
          f"${price:.2f}/GPU-hour")
    print(f"{'stage':>5} {'res':>4} {'mask':>5} {'steps':>8} {'images':>10} {'GFLOPs/img':>11} "
          f"{'FLOPs':>9} {'GPU-h':>9} {'$':>9}")
    for s in stages:
        h = gpu_hours(s["flops"], gpu_peak, mfu)
        print(f"{s['stage']:>5} {s['res']:>4} {s['mask_ratio']:>5.2f} {s['steps']:>8,} {s['images']:>10.3g} "
              f"{s['flops_per_image'] / 1e9:>11.1f} {s['flops']:>9.3g} {h:>9.4g} {dollars(h, price):>9,.0f}")
    total = sum(s["flops"] for s in stages)
    h = gpu_hours(total, gpu_peak, mfu)
    print(f"{'total':>5} {'':>4} {'':>5} {sum(s['steps'] for s in stages):>8,} "
          f"{sum(s['images'] for s in stages):>10.3g} {'':>11} {total:>9.3g} {h:>9.4g} "
          f"{dollars(h, price):>9,.0f}")
    m = implied_mfu(total, gpu_peak=gpu_peak)
    hours = PAPER_DAYS * 24 * PAPER_GPUS
    print(f"implied MFU of the paper's run: {total:.3g} FLOPs / ({PAPER_DAYS} days x {PAPER_GPUS} GPUs x "
          f"{gpu_peak / 1e12:.1f} TFLOP/s) = {m:.1%}")
    print(f"at that MFU: {hours:.0f} GPU-hours, ${dollars(hours, price):,.0f} "
          f"(the paper: ${PAPER_DOLLARS:,})")
    return stages


# -----------------------------------------------------------------------------
# the COCO FID-30K protocol: sampling 30,000 images, then scoring them

# The networks as their Hub config.json files define them, built on the meta device only to count FLOPs.
SDXL_VAE_ARCH = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, scaling_factor=0.13025)
DFN5B_TEXT_ARCH = dict(width=1024, heads=16, layers=24, mlp_width=4096, act="quick_gelu")  # ViT-H/14 text
CLIP_L14_ARCH = dict(vision=dict(image_size=224, patch_size=14, width=1024, heads=16, layers=24, mlp_width=4096),
                     text=dict(width=768, heads=12, layers=12, mlp_width=3072), embed_dim=768)
COCO_VAL2014_IMAGES = 40_504  # the reference statistics: every val2014 image, once


def forward_flops(fn, *inputs):
    """FLOPs (matmuls and convolutions, as model.py counts them) of one call on meta tensors."""
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def protocol_cost(preset="MicroDiT_XL_2", res=512, n_images=30_000, steps=30, guidance=True):
    """{part: FLOPs} of the COCO protocol (sample.py, then fid.py protocol) for n_images at res px:
    Heun takes 2 x steps - 1 network calls, each on a conditional and an unconditional copy under guidance;
    the reference statistics (Inception on COCO val2014) are counted once."""
    calls = (2 * steps - 1) * (2 if guidance else 1)
    with torch.device("meta"):
        vae, inception = AutoencoderKL(SDXL_VAE_ARCH), InceptionV3()
        text, clip = CLIPTextTransformer(**DFN5B_TEXT_ARCH), CLIP(**CLIP_L14_ARCH)
        tokens = torch.zeros(1, 77, dtype=torch.long)
        latent, pixels = torch.zeros(1, 4, res // 8, res // 8), torch.zeros(1, 3, 299, 299)
        clip_pixels = torch.zeros(1, 3, 224, 224)
        inception_flops = forward_flops(inception, pixels)
        parts = {
            "text encoder (DFN5B CLIP-H, once per caption)": n_images * forward_flops(text, tokens),
            f"denoiser ({preset}, {calls} calls per image)":
                n_images * calls * flops_per_image(stage_config(get_config(preset), res), 0.0, train=False),
            "VAE decoder (SDXL)": n_images * forward_flops(vae.decode, latent),
            "Inception, generated images": n_images * inception_flops,
            "Inception, COCO val2014 reference (once)": COCO_VAL2014_IMAGES * inception_flops,
            "CLIP ViT-L/14 score (image + caption)": n_images * (forward_flops(clip.visual, clip_pixels)
                                                                 + forward_flops(clip.text, tokens)),
        }
    return parts


def print_protocol_cost(preset="MicroDiT_XL_2", res=512, n_images=30_000, steps=30, gpu_peak=H100_BF16_PEAK,
                        mfu=DEFAULT_MFU):
    parts = protocol_cost(preset, res, n_images, steps)
    total = sum(parts.values())
    print(f"COCO FID-{n_images // 1000}K protocol, {preset} at {res}px, {steps} Heun steps, guidance on; "
          f"peak {gpu_peak / 1e12:.1f} TFLOP/s at MFU {mfu:.0%}")
    for name, flops in parts.items():
        print(f"{name:48s} {flops:10.3g} FLOPs {flops / total:6.1%} {gpu_hours(flops, gpu_peak, mfu):8.3g} GPU-h")
    h = gpu_hours(total, gpu_peak, mfu)
    print(f"{'total':48s} {total:10.3g} FLOPs {'':6s} {h:8.3g} GPU-h ({h / 8:.2g} h on 8 GPUs)")
    return parts


# -----------------------------------------------------------------------------
# the UNets of Paper B's Table 1: parameters and MACs counted here, beside the paper's own figures

# Paper B Table 1: name -> (params in B, GMACs at 256px, attention GMACs), printed beside our counts.
PAPER_B_TABLE1 = {
    "UNet_SD2_C320": (0.87, 86, 34), "UNet_SD2_C512": (2.19, 219, 85),
    "UNet_IF_XL_C512": (2.04, 194, 23), "UNet_IF_XL_C704": (3.83, 364, 42),
    "UNet_SDXL_C128": (0.42, 35, 23), "UNet_SDXL_C192": (0.90, 75, 48),
    "UNet_SDXL_C320": (2.39, 198, 127), "UNet_SDXL_C384": (3.40, 282, 179),
    "UNet_TD2": (0.85, 98, 43), "UNet_TD4": (1.24, 123, 64), "UNet_TD12": (2.78, 223, 147),
    "UNet_TD14": (3.16, 248, 168), "UNet_TD4_4": (1.32, 143, 84), "UNet_TD4_8": (2.09, 193, 123),
    "UNet_TD4_12": (2.86, 243, 167), "UNet_C384_TD4_12": (4.07, 346, 237),
}


def unet_macs(cfg, latent_size=None, num_tokens=77):
    """Forward multiply-accumulates of one image, by FlopCounterMode on the meta device (FLOPs = 2 * MACs).

    total: every op. sdpa: the QK^T and softmax(.)V matmuls (SDPA runs them as bmm on the meta
    device). attn: conv/linear MACs inside the down- and up-path transformer (IF: attention)
    blocks; mid_attn: the same inside the middle block. Paper B's Table 1 matches
    GMACs = total - sdpa and attn GMACs = attn (README "UNet family"): its counter saw only
    conv and linear layers, and its attention column leaves out the middle block.
    """
    s = latent_size or cfg.latent_size
    with torch.device("meta"):
        net = UNet(cfg)
        x = torch.zeros(1, cfg.latent_channels, s, s)
        c_noise, y = torch.zeros(1), torch.zeros(1, num_tokens, cfg.caption_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, c_noise, y)
    counts = counter.get_flop_counts()  # {"UNet.down.1.attn.0": {op: flops}, ..., "Global": {...}}
    sdpa = sum(v for op, v in counts["Global"].items() if "bmm" in str(op))
    attn = mid_attn = 0
    for name, m in net.named_modules():
        if isinstance(m, (SpatialTransformer, IFAttention)):
            linear = sum(v for op, v in counts[f"UNet.{name}"].items() if "bmm" not in str(op))
            if name.startswith("mid."):
                mid_attn += linear
            else:
                attn += linear
    return {"total": counter.get_total_flops() / 2, "sdpa": sdpa / 2, "attn": attn / 2,
            "mid_attn": mid_attn / 2}


def print_unet_table(latent_size=32):
    """Print params, GMACs and attention GMACs of the 16 Table-1 presets beside Paper B's figures."""
    print(f"UNet presets at a {latent_size}x{latent_size} latent (256px), MACs by FlopCounterMode "
          "on the meta device.")
    print("GMACs: all ops; -sdpa: without the QK^T / softmax(.)V matmuls; attn: conv/linear MACs in the")
    print("down/up transformer blocks (the reading that fits Paper B); +mid: with the middle block's. "
          "[paper]")
    print(f"{'preset':17s} | {'params B [paper]':>20s} | {'GMACs [paper]':>19s} | {'-sdpa':>6s} | "
          f"{'attn [paper]':>12s} {'share [paper]':>15s} | {'+mid':>6s}")
    for name, (p_ref, g_ref, a_ref) in PAPER_B_TABLE1.items():
        cfg = UNET_PRESETS[name]
        n = param_count(cfg) / 1e9
        m = {k: v / 1e9 for k, v in unet_macs(cfg, latent_size).items()}
        lin = m["total"] - m["sdpa"]
        print(f"{name:17s} | {n:6.3f} [{p_ref:4.2f}] {n / p_ref - 1:+5.1%} | "
              f"{m['total']:6.1f} [{g_ref:3d}] {m['total'] / g_ref - 1:+5.1%} | "
              f"{lin:6.1f} | {m['attn']:6.1f} [{a_ref:3d}] {m['attn'] / lin:6.1%} [{a_ref / g_ref:5.1%}] | "
              f"{m['attn'] + m['mid_attn']:6.1f}")
    a, b = param_count(UNET_PRESETS["UNet_TD4_4"]), param_count(UNET_PRESETS["UNet_SDXL_C320"])
    ma, mb = (unet_macs(UNET_PRESETS["UNet_TD4_4"], latent_size),
              unet_macs(UNET_PRESETS["UNet_SDXL_C320"], latent_size))
    print(f"TD4_4 vs SDXL C320: {1 - a / b:.1%} fewer params, {1 - ma['total'] / mb['total']:.1%} fewer MACs "
          f"({1 - (ma['total'] - ma['sdpa']) / (mb['total'] - mb['sdpa']):.1%} without sdpa) "
          "[paper: 45%, 28%]")


# -----------------------------------------------------------------------------
# power laws on the Pareto frontier (Li et al. 2024)


def pareto_frontier(x, y, maximize=True):
    """Indices, by increasing x, of the points that no point of lower-or-equal x matches or beats in y."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    sign = 1.0 if maximize else -1.0
    order = np.lexsort((-sign * y, x))  # by x; at equal x the best y first, so only it can be kept
    keep, best = [], -np.inf
    for i in order:
        if sign * y[i] > best:
            keep.append(i)
            best = sign * y[i]
    return np.array(keep, dtype=int)


def fit_power_law(x, y):
    """(a, b) of y = a x^b, by least squares on log y = log a + b log x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(np.unique(x)) < 2:
        raise ValueError(f"fit_power_law: need at least 2 distinct x values, got {len(np.unique(x))}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("fit_power_law: x and y must be positive (the fit is in log-log space)")
    b, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return np.exp(log_a), b


def fit_frontier_power_law(x, y, maximize=True):
    """(a, b) of y = a x^b fitted on the Pareto frontier of the points only, as Li et al. fit TIFA scores."""
    i = pareto_frontier(x, y, maximize)
    return fit_power_law(np.asarray(x, float)[i], np.asarray(y, float)[i])


# -----------------------------------------------------------------------------
# L(N, D) = E + A / N^alpha + B / D^beta, fitted as Chinchilla approach 3 (Hoffmann et al. 2022, Sec. 3.3;
# Besiroglu et al. 2024)

CHINCHILLA_GRID = list(itertools.product(  # initialisations (a, b, e, alpha, beta), 6*6*5*5*5 = 4,500
    np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.01, 0.5),
    np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5)))
HUBER_DELTA = 1e-3
LBFGS_TIGHT = dict(ftol=0, gtol=1e-14, maxiter=20000)  # the final run from the best start: see fit_chinchilla


def huber(r, delta=HUBER_DELTA):
    """Huber loss of residuals r: quadratic within delta, linear beyond, continuous in value and slope."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def chinchilla_objective(theta, log_N, log_D, log_L, delta=HUBER_DELTA):
    """Summed Huber loss of log L and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    # log L = LSE(a - alpha log N, b - beta log D, e), with A, B, E = exp(a, b, e): positive by construction
    z = np.stack([a - alpha * log_N, b - beta * log_D, np.full_like(log_N, e)])  # (3, P)
    m = z.max(axis=0)
    w = np.exp(z - m)  # (3, P)
    s = w.sum(axis=0)
    pred = m + np.log(s)  # (P,)
    w /= s  # softmax weights: d pred / d (a, b, e)
    r = pred - log_L
    # summed, not averaged: an averaged loss is so small that L-BFGS stops early (Besiroglu et al. 2024)
    loss = huber(r, delta).sum()
    g = np.clip(r, -delta, delta)  # d huber / d r
    grad = np.array([g @ w[0], g @ w[1], g @ w[2], -(g * w[0]) @ log_N, -(g * w[1]) @ log_D])
    return loss, grad


def fit_chinchilla(N, D, L, inits=None, delta=HUBER_DELTA):
    """{'E', 'A', 'B', 'alpha', 'beta'}: L-BFGS from every initialisation (Hoffmann et al.'s grid, as
    Besiroglu et al. 2024 rerun it), best one polished."""
    from scipy.optimize import minimize  # here, not at import: see the note on OPENBLAS_NUM_THREADS below
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if not (N.shape == D.shape == L.shape and N.ndim == 1):
        raise ValueError(f"fit_chinchilla: N, D, L must be 1-D and of one length, got {N.shape}, "
                         f"{D.shape}, {L.shape}")
    if (N <= 0).any() or (D <= 0).any() or (L <= 0).any():
        raise ValueError("fit_chinchilla: N, D and L must be positive")
    args = (np.log(N), np.log(D), np.log(L), delta)
    best = None
    for theta0 in (CHINCHILLA_GRID if inits is None else inits):
        res = minimize(chinchilla_objective, np.array(theta0, float), args=args, jac=True, method="L-BFGS-B")
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    # Even summed, the loss is tiny (~1e-5 for 64 points at 0.1% noise) and L-BFGS-B stops once f improves by
    # less than 2.2e-9 * max(|f|, 1), an absolute 2.2e-9 here: most starts stop short of the optimum
    # (measured: 4 of 300 reach it). The grid picks the basin; one run from its best start, stopped by the
    # gradient alone (ftol=0: with ftol=1e-14, B of a noiseless replication law stopped 0.13% short on one
    # BLAS), finishes.
    best = minimize(chinchilla_objective, best.x, args=args, jac=True, method="L-BFGS-B", options=LBFGS_TIGHT)
    a, b, e, alpha, beta = best.x
    return dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta)


def chinchilla_loss(fit, N, D):
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return (fit["E"] + fit["A"] / np.asarray(N, float) ** fit["alpha"]
            + fit["B"] / np.asarray(D, float) ** fit["beta"])


def compute_optimal(C, fit, k):
    """(N_opt, D_opt) minimising L(N, D) under the budget C = k N D (k = FLOPs per parameter per image)."""
    # d/dN [A N^-alpha + B (C/(kN))^-beta] = 0  ->  alpha A N^-alpha = beta B D^-beta, which gives
    # N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = (C/k) / N_opt = G^-1 (C/k)^(alpha/(alpha+beta))
    # (Hoffmann et al. 2022, section 3.3, with k = 6 FLOPs per parameter per token there)
    alpha, beta, A, B = fit["alpha"], fit["beta"], fit["A"], fit["B"]
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    x = np.asarray(C, float) / k
    return G * x ** (beta / (alpha + beta)), x ** (alpha / (alpha + beta)) / G


# -----------------------------------------------------------------------------
# bootstrap intervals


def bootstrap(fit, columns, n_boot=200, seed=0, level=0.95):
    """(lo, hi) percentile intervals of fit(*columns)'s parameters over resamples of the rows,
    and the count used."""
    rng = np.random.default_rng(seed)
    columns = [np.asarray(c, float) for c in columns]
    n = len(columns[0])
    reps = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        try:
            reps.append(np.asarray(fit(*(c[i] for c in columns)), float))
        except ValueError:  # a resample too degenerate to fit, e.g. a frontier of one distinct x
            continue
    if not reps:
        raise ValueError(f"bootstrap: none of {n_boot} resamples of {n} points could be fitted")
    q = 50 * (1 - level)
    lo, hi = np.percentile(np.array(reps), [q, 100 - q], axis=0)
    return lo, hi, len(reps)


def bootstrap_chinchilla(N, D, L, fit, n_boot=200, seed=0, level=0.95):
    """Intervals of (E, A, B, alpha, beta); each resample's L-BFGS starts from the full-data optimum `fit`."""
    # The grid's job is to find the right basin; a resample of the same points stays in it, and 4,500
    # starts per resample (~20 s each here) would make 200 resamples take over an hour.
    theta = [np.log(fit["A"]), np.log(fit["B"]), np.log(fit["E"]), fit["alpha"], fit["beta"]]
    refit = lambda n, d, l: list(fit_chinchilla(n, d, l, inits=[theta]).values())
    return bootstrap(refit, [N, D, L], n_boot, seed, level)


# -----------------------------------------------------------------------------
# Results as JSON lines (read by report.py's read_jsonl): a sweep's and the ablations' rows (experiments.py)


def load_rows(path, keys, min_rows=0):
    """The rows of a results JSONL (sweep or ablate), each checked for the keys they write."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        if missing := [k for k in keys if k not in row]:
            raise ValueError(f"{path}: row {lineno}: missing keys {missing}")
    if len(rows) < min_rows:
        raise ValueError(f"{path}: {len(rows)} runs; fitting needs at least {min_rows}")
    return rows


# -----------------------------------------------------------------------------
# fitting a sweep's results

RESULT_KEYS = ("model", "params", "steps", "images", "flops", "final_loss",
               "acc_shape", "acc_colour", "acc_position", "acc_mean", "wall_s")
AXES = [("flops", "compute (FLOPs)"), ("params", "parameters"), ("images", "images seen")]
TARGETS = [("final_loss", "final loss", False), ("acc_mean", "mean accuracy", True)]  # (key, label, maximize)


def fit_results(rows, n_boot=200, seed=0):
    """Power laws of loss and accuracy against compute, parameters and images; L(N, D);
    compute-optimal split."""
    col = lambda k: np.array([r[k] for r in rows], float)
    out = {"power_laws": []}
    for (y_key, _, maximize), (x_key, _) in itertools.product(TARGETS, AXES):
        x, y = col(x_key), col(y_key)
        ok = y > 0  # log-log fits need a positive score; an accuracy of 0 says nothing about the slope
        law = dict(y=y_key, x=x_key, frontier=pareto_frontier(x[ok], y[ok], maximize).tolist())
        try:
            a, b = fit_frontier_power_law(x[ok], y[ok], maximize)
            lo, hi, n_ok = bootstrap(lambda x, y: fit_frontier_power_law(x, y, maximize), [x[ok], y[ok]],
                                     n_boot, seed)
            law.update(a=a, b=b, a_ci=(lo[0], hi[0]), b_ci=(lo[1], hi[1]), n_boot=n_ok)
        except ValueError as e:
            # e.g. every run scored 0, or the frontier is a single run: report, fit the rest
            law.update(error=str(e))
        out["power_laws"].append(law)
    N, D, L = col("params"), col("images"), col("final_loss")
    fit = fit_chinchilla(N, D, L)
    lo, hi, n_ok = bootstrap_chinchilla(N, D, L, fit, n_boot, seed)
    out["chinchilla"] = dict(fit=fit, ci={k: (l, h) for k, l, h in zip(fit, lo, hi)}, n_boot=n_ok)
    # k = FLOPs per parameter per image, as measured on these runs (about 6 x tokens for a transformer)
    k = float(np.median(col("flops") / (N * D)))
    budgets = col("flops").max() * np.array([1.0, 10.0, 100.0])
    N_opt, D_opt = compute_optimal(budgets, fit, k)
    out["compute_optimal"] = dict(k=k, budgets=budgets.tolist(), N_opt=N_opt.tolist(), D_opt=D_opt.tolist(),
                                  loss=chinchilla_loss(fit, N_opt, D_opt).tolist())
    return out


def print_fits(fits, n_runs):
    print(f"power laws y = a x^b on the Pareto frontier of {n_runs} runs (95% bootstrap intervals):")
    for p in fits["power_laws"]:
        if "error" in p:
            print(f"  {p['y']:>10} vs {p['x']}: not fitted ({p['error']})")
            continue
        print(f"  {p['y']:>10} = {p['a']:.4g} [{p['a_ci'][0]:.3g}, {p['a_ci'][1]:.3g}] * {p['x']}^"
              f"{p['b']:+.4f} [{p['b_ci'][0]:+.4f}, {p['b_ci'][1]:+.4f}]   "
              f"({len(p['frontier'])} frontier points)")
    c = fits["chinchilla"]
    print(f"L(N, D) = E + A/N^alpha + B/D^beta, N = params, D = images ({c['n_boot']} bootstrap resamples):")
    for k, v in c["fit"].items():
        print(f"  {k:>5} = {v:.4g}  [{c['ci'][k][0]:.4g}, {c['ci'][k][1]:.4g}]")
    o = fits["compute_optimal"]
    print(f"compute-optimal split, C = k N D with k = {o['k']:.3g} FLOPs per parameter per image:")
    for C, n, d, l in zip(o["budgets"], o["N_opt"], o["D_opt"], o["loss"]):
        print(f"  C = {C:.3g}: N = {n:.3g} params, D = {d:.3g} images, predicted loss {l:.4f}")


def plot_fits(rows, fits, path):
    """Log-log panels of loss and accuracy against compute, parameters and images, with the frontier fits."""
    from matplotlib import ticker
    plt = pyplot()
    models = sorted({r["model"] for r in rows},
                    key=lambda m: min(r["params"] for r in rows if r["model"] == m))
    fig, axes = plt.subplots(len(TARGETS), len(AXES), figsize=(4 * len(AXES), 3.4 * len(TARGETS)),
                             squeeze=False)
    laws = iter(fits["power_laws"])  # in the order fit_results made them: targets outer, axes inner
    for (y_key, y_label, _), row_axes in zip(TARGETS, axes):
        for (x_key, x_label), ax in zip(AXES, row_axes):
            law = next(laws)
            for m in models:
                pts = np.array([(r[x_key], r[y_key]) for r in rows if r["model"] == m and r[y_key] > 0])
                if len(pts):
                    ax.scatter(pts[:, 0], pts[:, 1], label=m, s=20)
            x = np.array([r[x_key] for r in rows if r[y_key] > 0], float)
            y = np.array([r[y_key] for r in rows if r[y_key] > 0], float)
            if "error" not in law:
                f = law["frontier"]
                ax.scatter(x[f], y[f], s=80, facecolors="none", edgecolors="k", label="frontier")
                xs = np.geomspace(x.min(), x.max(), 50)
                ax.plot(xs, law["a"] * xs ** law["b"], "k--", lw=1, label=f"{law['a']:.3g} x^{law['b']:.3f}")
            ax.set(xscale="log", yscale="log", xlabel=x_label, ylabel=y_label)
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))  # 1.4, not 1.4 x 10^0
            ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.3g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # minor labels of a short decade overlap
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    save_figure(fig, path)


# -----------------------------------------------------------------------------


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the text's own line breaks."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = lambda name, text: sub.add_parser(name, help=text, description=text, formatter_class=Help)
    c = add("cost", "FLOPs, GPU-hours and dollars of the MicroDiT recipe, stage by stage")
    c.add_argument("--preset", default="MicroDiT_XL_2", choices=list(PRESETS))
    c.add_argument("--gpu-peak", type=float, default=H100_BF16_PEAK / 1e12, help="peak TFLOP/s of one GPU")
    c.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation to price at")
    c.add_argument("--price", type=float, default=PRICE_PER_GPU_HOUR, help="dollars per GPU-hour")
    q = add("protocol-cost", "FLOPs and GPU-hours of the COCO FID-30K protocol: sampling and scoring")
    q.add_argument("--preset", default="MicroDiT_XL_2", choices=list(PRESETS))
    q.add_argument("--res", type=int, default=512, help="image resolution in pixels")
    q.add_argument("--n", type=int, default=30_000, help="generated images")
    q.add_argument("--steps", type=int, default=30, help="Heun steps")
    q.add_argument("--gpu-peak", type=float, default=H100_BF16_PEAK / 1e12, help="peak TFLOP/s of one GPU")
    q.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation")
    add("unets", "the 16 UNets of Paper B's Table 1: parameters and GMACs beside the paper's")
    memory.add_arguments(add("memory", "per-GPU memory of DDP, FSDP and FSDP + checkpointing: fits 80 GB?"))
    f = add("fit", "fit a sweep's results and plot them")
    f.add_argument("results", help="a sweep's results JSONL")
    f.add_argument("--plot", default=None, help="write a log-log PNG here")
    f.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples")
    f.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.epilog = "\n".join(f"python scaling.py {name} ...:\n{q.format_help()}"
                         for name, q in sub.choices.items())
    args = p.parse_args(argv)
    if args.cmd == "cost":
        if not (args.gpu_peak > 0 and 0 < args.mfu <= 1 and args.price >= 0):
            p.error(f"cost: need --gpu-peak > 0, 0 < --mfu <= 1, --price >= 0; got {args.gpu_peak}, "
                    f"{args.mfu}, {args.price}")
        print_cost(args.preset, args.gpu_peak * 1e12, args.mfu, args.price)
    elif args.cmd == "protocol-cost":
        if not (args.res % 8 == 0 and args.res > 0 and args.n > 0 and args.steps > 0 and args.gpu_peak > 0
                and 0 < args.mfu <= 1):
            p.error("protocol-cost: need --res a positive multiple of 8, --n, --steps, --gpu-peak > 0, "
                    f"0 < --mfu <= 1; got {args.res}, {args.n}, {args.steps}, {args.gpu_peak}, {args.mfu}")
        print_protocol_cost(args.preset, args.res, args.n, args.steps, args.gpu_peak * 1e12, args.mfu)
    elif args.cmd == "unets":
        print_unet_table()
    elif args.cmd == "memory":
        memory.run(args, sub.choices["memory"])
    else:
        try:
            rows = load_rows(args.results, RESULT_KEYS, min_rows=3)
        except FileNotFoundError as e:  # exit 2: the command names a file that is not there
            p.error(str(e))
        except ValueError as e:  # exit 1: the file's rows are damaged, or too few to fit
            p.exit(1, f"scaling.py: error: {e}\n")
        fits = fit_results(rows, args.n_boot, args.seed)
        print_fits(fits, len(rows))
        if args.plot:
            plot_fits(rows, fits, args.plot)
            print(f"wrote {args.plot}")


if __name__ == "__main__":
    # The fits run thousands of 5-variable L-BFGS problems; OpenBLAS threads only add synchronisation to
    # them (6x to 20x slower measured on a busy 2-core machine). Set before scipy first loads its BLAS.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
