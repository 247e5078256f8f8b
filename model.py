"""
The denoiser networks in plain PyTorch: MicroDiT of "Stretching Each Dollar" (Sehwag et al. 2024), a sparse
DiT with a patch-mixer, deferred masking, expert-choice MoE and layer-wise scaling, whose released checkpoints
(VSehwag24/MicroDiT) load with strict=True; and the UNet family of "On the Scalability of Diffusion-based
Text-to-Image Generation" (Li et al. 2024). Every size is a preset of PRESETS; flops_per_image is its cost.

Each is the raw network F of EDM (diffusion.py wraps it in the preconditioning): net(x, c_noise, y,
mask_ratio) -> (out, mask); x (B, C, H, W) latents scaled by c_in, c_noise (B,) = ln(sigma)/4, y (B, L, Dy)
caption token features; mask (B, T) is 1 for patches dropped by masking, or None.
"""
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# -----------------------------------------------------------------------------
# configuration


@dataclass
class MicroDiTConfig:
    latent_size: int = 32           # latent height = width (32 for 256px, 64 for 512px with the SDXL VAE)
    latent_channels: int = 4        # 4 for the SDXL VAE, 16 for ostris/vae-kl-f8-d16, 3 for raw pixels
    patch_size: int = 2
    dim: int = 1024                 # backbone width
    depth: int = 28                 # backbone blocks
    head_dim: int = 64              # attention head width (mixer and backbone)
    caption_dim: int = 1024         # width of the text encoder's token features
    mixer_depth: int = 6            # patch-mixer blocks; 0 = no mixer (naive masking)
    mixer_dim: int = 768            # patch-mixer width
    mixer_mlp_ratio: float = 4.0
    num_experts: int = 8            # expert-choice MoE in every 2nd block; 0 = dense FFN everywhere
    expert_capacity: float = 2.0    # each expert takes int(capacity * T / num_experts) tokens
    qkv_ratio: tuple = (0.5, 1.0)   # layer-wise scaling: attention width ratio, linspace over depth
    mlp_ratio: tuple = (0.5, 4.0)   # layer-wise scaling: FFN ratio; (4.0, 4.0) = uniform widths
    multiple_of: int = 256          # FFN hidden sizes are rounded up to a multiple of this
    pos_interp_scale: float = 1.0   # 2.0 for the 512px model: same position range as at 256px
    bias: bool = False              # biases in block linears (False in the released models)


def _cpu(**kw):
    # CPU-sized, for the built-in 32x32 RGB shapes dataset (pixels are the "latents"): patch 4 -> 64 tokens
    cpu = dict(latent_size=32, latent_channels=3, patch_size=4, head_dim=32, caption_dim=64, num_experts=4,
               mlp_ratio=(1.0, 4.0), multiple_of=32)
    return MicroDiTConfig(**{**cpu, **kw})


PRESETS = {
    # as released (micro_diffusion/models/dit.py); 512px checkpoints use latent_size=64, pos_interp_scale=2
    "MicroDiT_XL_2": MicroDiTConfig(),
    "MicroDiT_Tiny_2": MicroDiTConfig(dim=512, depth=16, head_dim=32, mixer_depth=4, mixer_dim=512),
    # XS, S, M: the scaling sweep and the ablations; S_nomixer (S without its patch-mixer): train.py's default
    "MicroDiT_XS": _cpu(dim=96, depth=4, mixer_depth=1, mixer_dim=96),
    "MicroDiT_S": _cpu(dim=128, depth=6, mixer_depth=2, mixer_dim=128),
    "MicroDiT_S_nomixer": _cpu(dim=128, depth=6, mixer_depth=0, mixer_dim=128),
    "MicroDiT_M": _cpu(dim=192, depth=8, mixer_depth=2, mixer_dim=128),
    "MicroDiT_S_2": _cpu(patch_size=2, dim=96, depth=8, mixer_depth=2, mixer_dim=64),  # 256 tokens, as XL_2
    # tiny, for tests: every ingredient present (mixer with width maps, MoE in mixer and backbone)
    "MicroDiT_test": MicroDiTConfig(latent_size=8, latent_channels=3, patch_size=2, dim=32, depth=3,
                                    head_dim=8, caption_dim=16, mixer_depth=2, mixer_dim=16, num_experts=4,
                                    multiple_of=16),
}


def round_up(n, multiple):
    return multiple * math.ceil(n / multiple)


def layer_widths(cfg):
    """Per-block (attention width, FFN hidden size, is_moe) of the backbone (layer-wise scaling)."""
    out = []
    for i in range(cfg.depth):
        t = i / (cfg.depth - 1) if cfg.depth > 1 else 1.0
        q = cfg.qkv_ratio[0] + t * (cfg.qkv_ratio[1] - cfg.qkv_ratio[0])
        r = cfg.mlp_ratio[0] + t * (cfg.mlp_ratio[1] - cfg.mlp_ratio[0])
        # attention width is a multiple of two heads, or the full width at ratio 1
        attn = cfg.dim if q == 1 else round_up(int(cfg.dim * q), 2 * cfg.head_dim)
        moe = cfg.num_experts > 0 and i % 2 == 1 and i != cfg.depth - 1  # the last block stays dense
        out.append((attn, ffn_hidden(cfg.dim, r, cfg.multiple_of, moe), moe))
    return out


def ffn_hidden(dim, ratio, multiple_of, moe):
    # SwiGLU keeps the parameter count of a 2-matrix MLP with the 2/3 rule; GELU experts do not
    hidden = int(dim * ratio)
    return round_up(hidden if moe else int(2 * hidden / 3), multiple_of)


# -----------------------------------------------------------------------------
# embeddings


def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim) as [sin, cos] (MAE/DiT layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim, grid_size, pos_interp_scale=1.0):
    """Fixed 2D position code (grid_size**2, dim): first half encodes x (column), second half y (row)."""
    coords = torch.arange(grid_size, dtype=torch.float64) / pos_interp_scale
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, x.flatten()), sincos_1d(dim // 2, y.flatten())], dim=1).float()


def timestep_embedding(t, dim=512, max_period=10000):
    """(B,) scalars -> (B, dim) frequency embedding as [cos, sin]."""
    half = torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * half)[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(dim, affine=True):
    # every LayerNorm of MicroDiT: eps 1e-6, no bias; QK-norm has no affine parameters at all
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine, bias=False)


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> LayerNorm -> Linear, for the caption tokens and the pooled caption."""

    def __init__(self, d_in, dim):
        super().__init__()
        self.fc1 = nn.Linear(d_in, dim)
        self.norm = layer_norm(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x), approximate="tanh")))


class TimestepEmbedder(nn.Module):
    """c_noise -> 512-d frequency embedding -> MLP."""

    def __init__(self, dim, freq_dim=512):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def forward(self, c_noise):
        return self.mlp(timestep_embedding(c_noise, self.freq_dim).to(self.mlp[0].weight.dtype))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, dim) by a strided conv."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# -----------------------------------------------------------------------------
# attention and feed-forward


def attention(q, k, v, heads, q_norm=None, k_norm=None):
    """Multi-head attention, QK-normed when norms are given. q (B, N, W), k and v (B, M, W) -> (B, N, W)."""
    B, N, W = q.shape
    if q_norm is not None:  # LayerNorm over all heads at once (QK-norm); SD2/SDXL and IF attention have none
        q, k = q_norm(q).to(v.dtype), k_norm(k).to(v.dtype)
    q, k, v = (t.reshape(B, -1, heads, W // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, W)


class SelfAttention(nn.Module):
    """Self-attention with QK-norm; its width may be smaller than the model's (layer-wise scaling)."""

    def __init__(self, dim, width, head_dim, bias):
        super().__init__()
        self.heads = width // head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=bias)
        self.proj = nn.Linear(width, dim, bias=bias)
        self.q_norm, self.k_norm = layer_norm(width, affine=False), layer_norm(width, affine=False)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attention(q, k, v, self.heads, self.q_norm, self.k_norm))


class CrossAttention(nn.Module):
    """Image tokens attend to the caption tokens, QK-normed like self-attention."""

    def __init__(self, dim, head_dim, bias):
        super().__init__()
        self.heads = dim // head_dim
        self.q_linear = nn.Linear(dim, dim, bias=bias)
        self.kv_linear = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm, self.k_norm = layer_norm(dim, affine=False), layer_norm(dim, affine=False)

    def forward(self, x, y):
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        return self.proj(attention(self.q_linear(x), k, v, self.heads, self.q_norm, self.k_norm))


class SwiGLU(nn.Module):
    """Dense FFN: w3(silu(w1 x) * w2 x)."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden, bias=bias), nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class ExpertChoiceMoE(nn.Module):
    """Expert-choice MoE (Zhou et al. 2022): each expert picks its top tokens within each sample."""

    def __init__(self, dim, hidden, num_experts, capacity):
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def route(self, x):
        """(B, T, D) -> gate values and token ids (B, E, k): each expert's top-k tokens in each sample."""
        k = int(self.capacity * x.shape[1] / self.num_experts)  # tokens per expert
        probs = self.gate(x).float().softmax(dim=-1)  # (B, T, E)
        # routing is per image: an expert's choice never depends on the other samples of the batch
        return probs.transpose(1, 2).topk(k, dim=-1)

    def forward(self, x):
        B, T, D = x.shape
        g, idx = self.route(x)  # (B, E, k)
        n = idx.shape[1] * idx.shape[2]
        idx = idx.reshape(B, n, 1).expand(-1, -1, D)
        xe = x.gather(1, idx).reshape(*g.shape, D)  # (B, E, k, D) the tokens each expert chose
        h = F.gelu(torch.einsum("bekd,edf->bekf", xe, self.w1))
        h = torch.einsum("bekf,efd->bekd", h, self.w2) * g.unsqueeze(-1).to(h.dtype)
        # a token chosen by several experts sums their outputs; one chosen by none gets zero
        return h.new_zeros(B, T, D).scatter_add(1, idx, h.reshape(B, n, D))


# -----------------------------------------------------------------------------
# blocks


class Block(nn.Module):
    """adaLN block: gated self-attention, ungated cross-attention, gated FFN (dense or MoE)."""

    def __init__(self, dim, attn_width, ffn, moe, cfg):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = layer_norm(dim), layer_norm(dim), layer_norm(dim)
        self.attn = SelfAttention(dim, attn_width, cfg.head_dim, cfg.bias)
        self.cross_attn = CrossAttention(dim, cfg.head_dim, cfg.bias)
        self.mlp = (ExpertChoiceMoE(dim, ffn, cfg.num_experts, cfg.expert_capacity) if moe
                    else SwiGLU(dim, ffn, cfg.bias))
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, 6 * dim))

    def forward(self, x, y, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, 1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), y)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class CaptionBlock(nn.Module):
    """Pre-LN transformer block (no adaLN) that refines the caption tokens once."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(cfg.dim), layer_norm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.dim, cfg.head_dim, cfg.bias)
        self.mlp = SwiGLU(cfg.dim, ffn_hidden(cfg.dim, 4.0, cfg.multiple_of, moe=False), cfg.bias)

    def forward(self, y):
        y = y + self.attn(self.norm1(y))
        return y + self.mlp(self.norm2(y))


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN shift/scale -> Linear to patch pixels."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.adaLN_modulation = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def mask_tokens(x, n_keep):
    """Keep n_keep random tokens per sample: kept (B, n_keep, D), mask (B, T) (1 = dropped), ids_restore."""
    B, T, D = x.shape
    ids_shuffle = torch.rand(B, T, device=x.device).argsort(dim=1)  # a random permutation per sample
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(B, T, device=x.device)
    mask[:, :n_keep] = 0
    return x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D)), mask.gather(1, ids_restore), ids_restore


# -----------------------------------------------------------------------------
# MicroDiT


class MicroDiT(nn.Module):
    """Sparse DiT: patch-mixer on all tokens, then masking, then a layer-wise scaled MoE backbone."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, p, D = cfg.latent_channels, cfg.patch_size, cfg.dim
        self.x_embedder = PatchEmbed(p, C, D)
        # fixed 2D sin-cos positions (1, T, D), a buffer: recomputed, not learned, for another latent size
        self.register_buffer("pos_embed", sincos_2d(D, cfg.latent_size // p, cfg.pos_interp_scale)[None])
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj = Mlp(cfg.caption_dim, D)  # caption tokens -> (B, L, D)
        self.y_emb_preprocess = CaptionBlock(cfg)
        self.pooled_y_emb_process = Mlp(D, D)  # mean caption token -> added to the timestep embedding
        if cfg.mixer_depth > 0:
            M = cfg.mixer_dim
            moe = [cfg.num_experts > 0 and i % 2 == 1 for i in range(cfg.mixer_depth)]
            ffn = [ffn_hidden(M, cfg.mixer_mlp_ratio, cfg.multiple_of, m) for m in moe]
            self.patch_mixer = nn.ModuleList(Block(M, M, f, m, cfg) for f, m in zip(ffn, moe))
            if M != D:  # width maps between the backbone and a narrower mixer
                self.patch_mixer_map_xin = nn.Sequential(layer_norm(D), nn.Linear(D, M, bias=cfg.bias))
                self.patch_mixer_map_xout = nn.Sequential(layer_norm(M), nn.Linear(M, D, bias=cfg.bias))
                self.patch_mixer_map_y = nn.Sequential(layer_norm(D), nn.Linear(D, M, bias=cfg.bias))
            else:
                self.patch_mixer_map_xin = nn.Identity()
                self.patch_mixer_map_xout = nn.Identity()
                self.patch_mixer_map_y = nn.Identity()
        self.blocks = nn.ModuleList(Block(D, a, f, m, cfg) for a, f, m in layer_widths(cfg))
        self.register_buffer("mask_token", torch.zeros(1, 1, p * p * C))  # fills the output's dropped patches
        self.final_layer = FinalLayer(D, p * p * C)
        self.initialize_weights()

    def initialize_weights(self):
        # as in the official dit.py: xavier everywhere, small normal on the embedding MLPs, depth-scaled block
        # outputs, zero on each adaLN output and on the final projection (each block starts as identity)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.y_embedder.y_proj.fc1,
                    self.y_embedder.y_proj.fc2, self.pooled_y_emb_process.fc1, self.pooled_y_emb_process.fc2):
            nn.init.normal_(lin.weight, std=0.02)
        blocks = [(b, 0.02 / math.sqrt(2 * (i + 1))) for i, b in enumerate(self.blocks)]
        blocks += [(b, 0.02 / math.sqrt(2 * self.cfg.depth)) for b in getattr(self, "patch_mixer", [])]
        for block, std in blocks:
            self._init_block(block, std)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
        self._init_block(self.y_emb_preprocess, 0.02)
        nn.init.zeros_(self.y_emb_preprocess.attn.proj.weight)
        nn.init.zeros_(self.y_emb_preprocess.mlp.w3.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    @staticmethod
    def _init_block(block, std):
        # inputs of each sub-layer: std 0.02; outputs that write into the residual stream: std
        weights = [(block.attn.qkv.weight, 0.02), (block.attn.proj.weight, std)]
        if hasattr(block, "cross_attn"):
            ca = block.cross_attn
            weights += [(ca.q_linear.weight, 0.02), (ca.kv_linear.weight, 0.02), (ca.proj.weight, std)]
        m = block.mlp
        weights += ([(m.gate.weight, 0.02), (m.w1, 0.02), (m.w2, std)] if isinstance(m, ExpertChoiceMoE)
                    else [(m.w1.weight, 0.02), (m.w2.weight, std), (m.w3.weight, std)])
        for w, s in weights:  # in this order: each draw advances the RNG
            nn.init.trunc_normal_(w, std=s)

    def forward(self, x, c_noise, y, mask_ratio=0.0):
        cfg = self.cfg
        B, C, H, W = x.shape
        if (C, H, W) != (cfg.latent_channels, cfg.latent_size, cfg.latent_size):
            raise ValueError(f"MicroDiT expects latents of shape (B, {cfg.latent_channels}, "
                             f"{cfg.latent_size}, {cfg.latent_size}), got {tuple(x.shape)}")
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        y = self.y_emb_preprocess(self.y_embedder.y_proj(y))  # (B, L, D)
        c = self.t_embedder(c_noise.expand(B)) + self.pooled_y_emb_process(y.mean(dim=1))  # (B, D)

        if cfg.mixer_depth > 0:  # the patch-mixer sees every patch, before any masking
            x, y_mixer = self.patch_mixer_map_xin(x), self.patch_mixer_map_y(y)  # (B, T, M), (B, L, M)
            for block in self.patch_mixer:
                x = block(x, y_mixer, c)

        mask = None
        if mask_ratio > 0:  # deferred masking: drop tokens only after the mixer has seen them all
            x, mask, ids_restore = mask_tokens(x, int(x.shape[1] * (1 - mask_ratio)))  # (B, T_keep, D)

        if cfg.mixer_depth > 0:  # mapping back to the backbone width after masking saves compute
            x = self.patch_mixer_map_xout(x)
        for block in self.blocks:
            x = block(x, y, c)  # (B, T_keep, D)
        x = self.final_layer(x, c)  # (B, T_keep, p*p*C)

        if mask is not None:  # a fixed zero token at every dropped patch, then undo the shuffle
            fill = self.mask_token.to(x.dtype).expand(B, mask.shape[1] - x.shape[1], -1)
            x = torch.cat([x, fill], dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.unpatchify(x), mask

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, C = self.cfg.patch_size, self.cfg.latent_channels
        g = self.cfg.latent_size // p
        x = x.reshape(x.shape[0], g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, g * p, g * p)


# -----------------------------------------------------------------------------
# UNet family of Paper B (Table 1): SD2, DeepFloyd-IF, SDXL and transformer-depth variants, laid out like
# diffusers' UNet2DConditionModel (the layout the paper's parameter counts fit to within 1%); the EDM
# network F exactly like MicroDiT: net(x, c_noise, y) -> (out, None).


@dataclass
class UNetConfig:
    latent_channels: int = 4  # SDXL VAE latents, as the scaling paper trains on
    caption_dim: int = 1024  # caption token width (OpenCLIP-H) = cross-attention key/value width
    base_channels: int = 320  # C of Table 1; level i has C * channel_mult[i] channels
    channel_mult: tuple = (1, 2, 4)  # one level per resolution, each halves H and W
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    transformer_depth: tuple = (0, 2, 10)  # transformer blocks after each ResBlock, per level (0 = none)
    mid_depth: int = 10  # transformer blocks in the middle block (0 = none)
    head_dim: int = 64  # attention heads = channels / head_dim
    block_type: str = "sd"  # "sd": SD2/SDXL blocks; "if": DeepFloyd-IF blocks (see UNet docstring)
    norm_groups: int = 32  # GroupNorm groups everywhere
    pooled_caption: bool = False  # add an MLP of the mean caption token to the time embedding, as MicroDiT
    latent_size: int = 32  # latent H = W the model is trained at (32 = 256px)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, timestep embedding in between; optional 2x down/up resampling (IF)."""

    def __init__(self, in_ch, out_ch, emb_dim, groups, scale_shift=False, resample=None):
        super().__init__()
        self.scale_shift = scale_shift  # IF: emb is a scale and shift of norm2; SD: emb is added before norm2
        self.resample = resample  # None, "down" (2x2 average pool) or "up" (nearest): IF's resampling blocks
        self.norm1, self.conv1 = nn.GroupNorm(groups, in_ch, eps=1e-5), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2, self.conv2 = nn.GroupNorm(groups, out_ch, eps=1e-5), nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.norm1(x))  # (B, in_ch, H, W)
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)  # nearest
        h = self.conv1(h)  # (B, out_ch, H', W')
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch or 2*out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SDAttention(nn.Module):
    """SD2/SDXL attention of image tokens over themselves (ctx=None) or over the caption tokens."""

    def __init__(self, dim, ctx_dim, head_dim):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k, self.to_v = nn.Linear(ctx_dim, dim, bias=False), nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, ctx=None):
        ctx = x if ctx is None else ctx  # (B, S, ctx_dim)
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)  # (B, T, dim), (B, S, dim), (B, S, dim)
        return self.to_out(attention(q, k, v, self.heads))


class GEGLU(nn.Module):
    """GEGLU feed-forward of SD: h * gelu(gate) with hidden width 4 * dim."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)  # (B, T, 4*dim) each
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the caption, GEGLU feed-forward."""

    def __init__(self, dim, ctx_dim, head_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), SDAttention(dim, dim, head_dim)
        self.norm2, self.attn2 = nn.LayerNorm(dim), SDAttention(dim, ctx_dim, head_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x, y):
        x = x + self.attn1(self.norm1(x))  # (B, T, dim)
        x = x + self.attn2(self.norm2(x), y)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """SD2/SDXL transformer on a feature map: GroupNorm, linear in-projection, blocks, out-projection."""

    def __init__(self, ch, depth, ctx_dim, head_dim, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList([TransformerBlock(ch, ctx_dim, head_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, y):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, H*W, C)
        for block in self.blocks:
            h = block(h, y)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class IFAttention(nn.Module):
    """DeepFloyd-IF attention: self-attention whose keys/values also hold the caption tokens; no FFN."""

    def __init__(self, ch, ctx_dim, head_dim, groups):
        super().__init__()
        self.heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch, eps=1e-5)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.add_k, self.add_v = nn.Linear(ctx_dim, ch), nn.Linear(ctx_dim, ch)  # the caption's keys, values
        self.to_out = nn.Linear(ch, ch)

    def forward(self, x, y):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        k = torch.cat([self.add_k(y), self.to_k(h)], dim=1)  # (B, L + H*W, C), caption tokens first
        v = torch.cat([self.add_v(y), self.to_v(h)], dim=1)
        h = self.to_out(attention(self.to_q(h), k, v, self.heads))  # (B, H*W, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """SD2/SDXL resampling: a strided 3x3 conv halving H and W, or nearest 2x upsampling then a 3x3 conv."""

    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb):  # emb unused: the same call as IF's resampling ResBlock
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNetLevel(nn.Module):
    """One resolution of the UNet: ResBlocks res[i], each followed by attn[i] (if any), then a resampler."""

    def __init__(self, res, attn, resample=None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty at levels without transformer blocks
        self.resample = resample


class UNet(nn.Module):
    """Text-conditioned UNet of Paper B Table 1. block_type "sd" (SD2, SDXL, TD variants): ResBlocks with the
    embedding added before norm2, SpatialTransformers (self-attn, cross-attn, GEGLU), strided-conv down- and
    nearest + conv upsampling. block_type "if" (DeepFloyd-IF): scale-shift ResBlocks, IFAttention (caption
    tokens joined to the self-attention keys, no FFN), ResBlocks that average-pool / upsample to resample."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, groups, hd = cfg.base_channels, cfg.norm_groups, cfg.head_dim
        ch = [C * m for m in cfg.channel_mult]
        depth = tuple(cfg.transformer_depth)
        if len(depth) != len(ch):
            raise ValueError(f"UNetConfig: transformer_depth {depth} needs one entry per level of "
                             f"channel_mult {tuple(cfg.channel_mult)}")
        if cfg.block_type not in ("sd", "if"):
            raise ValueError(f"UNetConfig: block_type must be 'sd' or 'if', got {cfg.block_type!r}")
        if cfg.block_type == "if" and max(depth + (cfg.mid_depth,)) > 1:
            raise ValueError(f"UNetConfig: block_type 'if' has one attention per ResBlock, so depths must be "
                             f"0 or 1, got transformer_depth {depth}, mid_depth {cfg.mid_depth}")
        if bad := [c for c in ch if c % groups or c % hd]:
            raise ValueError(f"UNetConfig: channels {bad} indivisible by norm_groups {groups}, head_dim {hd}")
        emb_dim, is_if = 4 * C, cfg.block_type == "if"  # emb_dim: SD/IF timestep embedding width

        def attn_block(c, d):  # d: transformer blocks (SD); IF has one attention, whatever d
            if is_if:
                return IFAttention(c, cfg.caption_dim, hd, groups)
            return SpatialTransformer(c, d, cfg.caption_dim, hd, groups)

        self.t_embedder = nn.Sequential(nn.Linear(C, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Paper B trains with "no extra conditioning"; pooled_caption adds MicroDiT's pooled-caption path.
        self.y_embedder = Mlp(cfg.caption_dim, emb_dim) if cfg.pooled_caption else None
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)

        # Down path: every ResBlock(+attention) output and every downsampled map is kept for a skip.
        skip_ch, c = [ch[0]], ch[0]
        self.down = nn.ModuleList()
        for i, c_out in enumerate(ch):
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResBlock(c, c_out, emb_dim, groups, is_if))
                c = c_out
                if depth[i]:
                    attn.append(attn_block(c, depth[i]))
                skip_ch.append(c)
            resample = None
            if i < len(ch) - 1:  # every level but the lowest halves H and W
                resample = ResBlock(c, c, emb_dim, groups, is_if, "down") if is_if else Resample(c, up=False)
                skip_ch.append(c)
            self.down.append(UNetLevel(res, attn, resample))

        mid_attn = [attn_block(c, cfg.mid_depth)] if cfg.mid_depth else []  # SDXL's middle is 10 deep too
        self.mid = UNetLevel([ResBlock(c, c, emb_dim, groups, is_if) for _ in range(2)], mid_attn)

        self.up = nn.ModuleList()  # num_res_blocks + 1 ResBlocks per level, each eating a skip (LIFO)
        for i in reversed(range(len(ch))):
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResBlock(c + skip_ch.pop(), ch[i], emb_dim, groups, is_if))
                c = ch[i]
                if depth[i]:
                    attn.append(attn_block(c, depth[i]))
            resample = None
            if i > 0:
                resample = ResBlock(c, c, emb_dim, groups, is_if, "up") if is_if else Resample(c, up=True)
            self.up.append(UNetLevel(res, attn, resample))

        self.norm_out = nn.GroupNorm(groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.latent_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        # PyTorch's default init, then zeros on each residual branch's last layer and the output conv (LDM/SD,
        # ADM): every block starts as the identity and F(x) = 0, so the denoiser starts at D(x) = c_skip * x
        last = {ResBlock: "conv2", SpatialTransformer: "proj_out", IFAttention: "to_out"}
        for layer in [getattr(m, last[type(m)]) for m in self.modules() if type(m) in last] + [self.conv_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c_noise, y, mask_ratio=0.0):
        if mask_ratio:
            raise ValueError(f"UNet.forward: a UNet has no patches to mask, got mask_ratio {mask_ratio}")
        cfg = self.cfg
        n = 2 ** (len(cfg.channel_mult) - 1)  # total downsampling
        if x.shape[1] != cfg.latent_channels or x.shape[2] % n or x.shape[3] % n:
            raise ValueError(f"UNet.forward: x {tuple(x.shape)} needs {cfg.latent_channels} channels "
                             f"and H, W divisible by {n}")
        emb = self.t_embedder(timestep_embedding(c_noise, cfg.base_channels).to(self.conv_in.weight.dtype))
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(y.mean(dim=1))  # all L tokens, padding included, as MicroDiT

        x = self.conv_in(x)  # (B, C, H, W)
        skips = [x]
        for level in self.down:
            for i, res in enumerate(level.res):
                x = res(x, emb)
                if level.attn:
                    x = level.attn[i](x, y)
                skips.append(x)
            if level.resample is not None:
                x = level.resample(x, emb)  # (B, c, H/2, W/2)
                skips.append(x)

        x = self.mid.res[0](x, emb)
        if self.mid.attn:
            x = self.mid.attn[0](x, y)
        x = self.mid.res[1](x, emb)

        for level in self.up:
            for i, res in enumerate(level.res):
                x = res(torch.cat([x, skips.pop()], dim=1), emb)  # (B, c + skip_c, h, w) -> (B, c, h, w)
                if level.attn:
                    x = level.attn[i](x, y)
            if level.resample is not None:
                x = level.resample(x, emb)  # (B, c, 2h, 2w)

        x = self.conv_out(F.silu(self.norm_out(x)))  # (B, latent_channels, H, W)
        return x, None


def _sd2(C):
    return UNetConfig(base_channels=C, channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), mid_depth=1)


def _if(C):
    # Paper B's IF-XL ([1,2,3,4], 3 res, attn [4,2,1], TD [1,1,1]) fits both rows (0.3%) read as attention
    # at downsampling rates 1, 2, 4 (the released IF-I-XL: 2, 4, 8), IF's blocks, a middle attention (README)
    return UNetConfig(base_channels=C, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                      transformer_depth=(1, 1, 1, 0), mid_depth=1, block_type="if")


def _sdxl(C, td=(0, 2, 10)):
    # SDXL puts the deepest level's transformer depth in the middle block as well.
    return UNetConfig(base_channels=C, channel_mult=(1, 2, 4), transformer_depth=td, mid_depth=td[-1])


UNET_PRESETS = {
    # Paper B, Table 1: 4 latent channels, 1024-wide OpenCLIP-H caption, head_dim 64, 32x32 latents.
    "UNet_SD2_C320": _sd2(320), "UNet_SD2_C512": _sd2(512),
    "UNet_IF_XL_C512": _if(512), "UNet_IF_XL_C704": _if(704),
    "UNet_SDXL_C128": _sdxl(128), "UNet_SDXL_C192": _sdxl(192),
    "UNet_SDXL_C320": _sdxl(320), "UNet_SDXL_C384": _sdxl(384),  # C320: the original SDXL layout
    "UNet_TD2": _sdxl(320, (0, 2, 2)), "UNet_TD4": _sdxl(320, (0, 2, 4)),
    "UNet_TD12": _sdxl(320, (0, 2, 12)), "UNet_TD14": _sdxl(320, (0, 2, 14)),
    "UNet_TD4_4": _sdxl(320, (0, 4, 4)),  # the paper's "efficient UNet"
    "UNet_TD4_8": _sdxl(320, (0, 4, 8)), "UNet_TD4_12": _sdxl(320, (0, 4, 12)),
    "UNet_C384_TD4_12": _sdxl(384, (0, 4, 12)),
    # for the built-in 32x32 shapes: SDXL-style, 4.2M params, 0.56 forward GMACs/image (MicroDiT_S: 0.60)
    "UNet_S": UNetConfig(latent_channels=3, caption_dim=64, base_channels=32, channel_mult=(1, 2, 4),
                         num_res_blocks=1, transformer_depth=(0, 1, 1), mid_depth=1, head_dim=32,
                         norm_groups=8, pooled_caption=True),
    "UNet_test": UNetConfig(latent_channels=3, caption_dim=16, base_channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, transformer_depth=(1, 1), mid_depth=1, head_dim=16,
                            norm_groups=8, pooled_caption=True, latent_size=8),
}

# -----------------------------------------------------------------------------
# building, by preset name or config


def get_config(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


PRESETS.update(UNET_PRESETS)  # one dict of every model preset
MODELS = {"MicroDiT": (MicroDiTConfig, MicroDiT), "UNet": (UNetConfig, UNet)}  # type: (config class, network)


def build_model(cfg):
    """A network from a preset name or a config dataclass."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    return MODELS[model_type(cfg)][1](cfg)


def model_type(cfg):
    return type(cfg).__name__.removesuffix("Config")


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def param_count(cfg):
    """Parameters of a config's network, built on the meta device (no memory, instant)."""
    with torch.device("meta"):
        return num_params(build_model(cfg))


# -----------------------------------------------------------------------------
# FLOPs, counted by PyTorch itself on the meta device (no memory, no compute)


MIXER = r"MicroDiT\.patch_mixer(\.\d+|_map_\w+)"  # the patch-mixer's modules: its blocks and its width maps


def flops_per_image(cfg, mask_ratio=0.0, train=True, caption_len=77, part=None):
    """FLOPs of one image, forward (+ backward when train); part: only modules matching this regex (MIXER)."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        net = build_model(cfg)
        x = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
        y, c_noise = torch.randn(1, caption_len, cfg.caption_dim), torch.zeros(1)
    with FlopCounterMode(display=False) as counter:
        out, _ = net(x, c_noise, y, mask_ratio)
        if train:
            out.sum().backward()
    part = part or "Global"  # FlopCounterMode's name for the whole
    return sum(sum(c.values()) for name, c in counter.get_flop_counts().items() if re.fullmatch(part, name))


if __name__ == "__main__":
    # parameter counts and FLOPs of the MicroDiT presets (the UNets of Paper B's Table 1: scaling.py unets)
    for name, cfg in PRESETS.items():
        if isinstance(cfg, MicroDiTConfig):
            L = 24 if cfg.caption_dim == 64 else 77  # caption tokens: the built-in text encoder's, or CLIP's
            f0, f75 = flops_per_image(cfg, 0.0, caption_len=L), flops_per_image(cfg, 0.75, caption_len=L)
            mixer = flops_per_image(cfg, 0.75, False, L, MIXER) / flops_per_image(cfg, 0.75, False, L)
            print(f"{name:16s} params {param_count(cfg):>15,d}   train GFLOPs/image: mask 0 {f0 / 1e9:9.2f}, "
                  f"mask 0.75 {f75 / 1e9:9.2f}   mixer's share of the forward at mask 0.75: {mixer:5.1%}")
