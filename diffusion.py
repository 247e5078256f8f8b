"""
EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"), the diffusion
formulation MicroDiT is trained with (the official micro_diffusion/models/model.py): the preconditioned
denoiser, the training noise levels, caption dropout for classifier-free guidance, and the loss on the
patches the backbone kept. The sampler that runs the denoiser is in sample.py.

Every network of model.py is the raw network F: net(c_in x, c_noise, y, mask_ratio) -> (out, mask).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# MicroDiT's sigma_data for SDXL latents (edm_config in micro_diffusion/models/model.py); EDM's own default is
# 0.5, for pixels
SIGMA_DATA = 0.9


class Denoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM, Table 1). It owns sigma_data, as EDM's
    EDMPrecond does: training and sampling go through the same object, so they cannot disagree on it."""

    def __init__(self, net, sigma_data=SIGMA_DATA):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data

    def forward(self, x, sigma, y, mask_ratio=0.0):
        """x (B, C, H, W) noisy latents, sigma (B,), y (B, L, Dy) -> (D_x float32, mask (B, T) or None)."""
        sd = self.sigma_data
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log().flatten() / 4
        F_x, mask = self.net((c_in * x).to(torch.float32), c_noise, y, mask_ratio)
        return c_skip * x + c_out * F_x.to(torch.float32), mask


def sample_sigma(n, P_mean, P_std, device=None, generator=None):
    """Training noise levels: ln(sigma) ~ N(P_mean, P_std^2) (EDM, Table 1)."""
    return (torch.randn(n, device=device, generator=generator) * P_std + P_mean).exp()


def training_noise(n, shape, P_mean, P_std, caption_dropout, device=None, generator=None):
    """The randomness of one training batch of n samples, drawn in a fixed order: sigma (n,), the noise
    (n, *shape), and which captions are kept (n,) bool, each dropped with probability caption_dropout."""
    sigma = sample_sigma(n, P_mean, P_std, device, generator)
    noise = torch.randn((n, *shape), device=device, generator=generator)
    keep = torch.rand(n, device=device, generator=generator) >= caption_dropout
    return sigma, noise, keep


def drop_captions(y, keep):
    """Classifier-free guidance training: a dropped caption becomes all-zero features, the unconditional
    input the sampler gives (as micro_diffusion/models/model.py zeroes dropped captions).
    y (B, L, Dy), keep (B,) bool."""
    return y * keep.reshape(-1, 1, 1).to(y.dtype)


def edm_loss(D, x, y, sigma, noise, mask_ratio=0.0):
    """lambda(sigma) |D(x + n; sigma) - x|^2 (EDM, Eq. 8, with the weight of Table 1) over the kept patches.
    x (B, C, H, W) clean latents, y (B, L, Dy), sigma (B,), noise (B, C, H, W)."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + D.sigma_data ** 2) / (sigma * D.sigma_data) ** 2
    D_x, mask = D(x + noise * sigma, sigma, y, mask_ratio)
    return masked_mean(weight * (D_x - x) ** 2, mask)


def masked_mean(err, mask):
    """Mean of a (B, C, H, W) error over channels, then per patch over the kept patches only: a dropped
    patch gets no loss (there is no decoder to reconstruct it); then the mean over the batch."""
    err = err.mean(dim=1)  # (B, H, W)
    if mask is None:
        return err.mean()
    p = math.isqrt(err.shape[1] * err.shape[2] // mask.shape[1])  # patch size: T = (H / p) * (W / p)
    err = F.avg_pool2d(err.unsqueeze(1), p).flatten(1)  # (B, T), in the tokens' row-major order
    keep = 1 - mask
    return ((err * keep).sum(dim=1) / keep.sum(dim=1)).mean()
