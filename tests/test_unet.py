# Tests of the UNet family (Paper B, Table 1). Big presets are built on the meta device.
import dataclasses
import functools
import json
import math
import re

import pytest
import torch

from model import UNET_PRESETS, UNet, UNetConfig, param_count
from scaling import unet_macs

# Paper B (Li et al. 2024, arXiv 2404.02883), Table 1, typed here independently of the code under test:
# preset -> (params in B, GMACs at 256px, attention GMACs).
TABLE1 = {
    "UNet_SD2_C320": (0.87, 86, 34), "UNet_SD2_C512": (2.19, 219, 85),
    "UNet_IF_XL_C512": (2.04, 194, 23), "UNet_IF_XL_C704": (3.83, 364, 42),
    "UNet_SDXL_C128": (0.42, 35, 23), "UNet_SDXL_C192": (0.90, 75, 48),
    "UNet_SDXL_C320": (2.39, 198, 127), "UNet_SDXL_C384": (3.40, 282, 179),
    "UNet_TD2": (0.85, 98, 43), "UNet_TD4": (1.24, 123, 64), "UNet_TD12": (2.78, 223, 147),
    "UNet_TD14": (3.16, 248, 168), "UNet_TD4_4": (1.32, 143, 84), "UNet_TD4_8": (2.09, 193, 123),
    "UNet_TD4_12": (2.86, 243, 167), "UNet_C384_TD4_12": (4.07, 346, 237),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny or on the meta device: extra threads only fight over the 2 shared cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_presets_cover_table1():
    assert set(TABLE1) <= set(UNET_PRESETS)
    for name in TABLE1:
        cfg = UNET_PRESETS[name]
        assert (cfg.latent_channels, cfg.caption_dim, cfg.head_dim, cfg.latent_size) == (4, 1024, 64, 32)
        assert not cfg.pooled_caption  # Paper B: "no extra conditioning"


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_params(name):
    # Acceptance asks 3% for the SD2/SDXL/TD rows; the diffusers-style layout lands within 1% on
    # all 16 (IF-XL included, with the reading in the _if preset comment).
    n = param_count(UNET_PRESETS[name]) / 1e9
    assert abs(n / TABLE1[name][0] - 1) < 0.01, (name, n)


@functools.cache
def _gmacs(name):
    return {k: v / 1e9 for k, v in unet_macs(UNET_PRESETS[name], latent_size=32).items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_macs(name):
    _, gmacs, attn_gmacs = TABLE1[name]
    m = _gmacs(name)
    # FlopCounterMode also counts the QK^T and softmax(.)V matmuls, which the paper left out: a few % over.
    assert 0 <= m["total"] / gmacs - 1 < 0.07, (name, m)
    # The paper's counter saw only conv/linear layers: without the SDPA matmuls we land within 1%.
    assert abs((m["total"] - m["sdpa"]) / gmacs - 1) < 0.01, (name, m)
    # Attention column = conv/linear MACs in the down/up transformer blocks (no middle block).
    assert abs(m["attn"] / attn_gmacs - 1) < 0.03, (name, m)


def test_td4_4_vs_sdxl():
    # Paper B: the efficient UNet TD4_4 has 45% fewer parameters and 28% fewer MACs than SDXL.
    td, sdxl = UNET_PRESETS["UNet_TD4_4"], UNET_PRESETS["UNet_SDXL_C320"]
    assert abs((1 - param_count(td) / param_count(sdxl)) - 0.45) < 0.01
    assert abs((1 - _gmacs("UNet_TD4_4")["total"] / _gmacs("UNet_SDXL_C320")["total"]) - 0.28) < 0.01


# -----------------------------------------------------------------------------
# Small-model behaviour


def _randomize(net, seed=0):
    """Replace every parameter with a random value (the zero-inits would hide bugs and block gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


def _inputs(cfg, B=2, seed=0, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.latent_size
    x = torch.randn(B, cfg.latent_channels, s, s, generator=g)
    c_noise = torch.randn(B, generator=g)
    y = torch.randn(B, 7, cfg.caption_dim, generator=g)
    return x, c_noise, y


TEST_CFGS = {
    "sd": UNET_PRESETS["UNet_test"],
    "if": dataclasses.replace(UNET_PRESETS["UNet_test"], block_type="if"),
    "sdxl_3level": dataclasses.replace(UNET_PRESETS["UNet_test"], channel_mult=(1, 2, 2), num_res_blocks=2,
                                       transformer_depth=(0, 1, 2), mid_depth=2, pooled_caption=False),
}


@pytest.mark.parametrize("kind", list(TEST_CFGS))
def test_forward_shape_and_init(kind):
    cfg = TEST_CFGS[kind]
    net = UNet(cfg)
    x, c_noise, y = _inputs(cfg)
    out, mask = net(x, c_noise, y)
    assert out.shape == x.shape and mask is None
    assert torch.all(out == 0)  # zero-initialised output conv: EDM starts at D(x) = c_skip * x
    out, _ = _randomize(net)(*_inputs(cfg, size=16))  # any size divisible by the total downsampling
    assert out.shape == (2, cfg.latent_channels, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", list(TEST_CFGS))
def test_gradients_reach_every_parameter(kind):
    net = _randomize(UNet(TEST_CFGS[kind]))
    out, _ = net(*_inputs(net.cfg))
    out.square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_bad_inputs_are_clear_errors():
    cfg = UNET_PRESETS["UNet_test"]
    net = UNet(cfg)
    x, c_noise, y = _inputs(cfg)
    with pytest.raises(ValueError, match="mask_ratio"):
        net(x, c_noise, y, mask_ratio=0.75)
    with pytest.raises(ValueError, match="divisible"):
        net(x[:, :, :7, :7], c_noise, y)
    with pytest.raises(ValueError, match="transformer_depth"):
        UNet(dataclasses.replace(cfg, transformer_depth=(1,)))
    with pytest.raises(ValueError, match="block_type"):
        UNet(dataclasses.replace(cfg, block_type="dit"))
    with pytest.raises(ValueError, match="head_dim"):
        UNet(dataclasses.replace(cfg, head_dim=24))


def test_config_json_roundtrip():
    # Checkpoints store the config as JSON, which turns tuples into lists.
    cfg = UNET_PRESETS["UNet_S"]
    back = UNetConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert param_count(back) == param_count(cfg)


def test_pooled_caption_changes_output():
    cfg = UNET_PRESETS["UNet_test"]
    net = _randomize(UNet(cfg))
    x, c_noise, y = _inputs(cfg)
    out = net(x, c_noise, y)[0]
    net.y_embedder.fc2.bias.data += 1.0  # only reaches the output through the pooled path
    assert not torch.allclose(out, net(x, c_noise, y)[0])


def test_one_adamw_step_reduces_edm_loss():
    torch.manual_seed(0)
    cfg, sd = UNET_PRESETS["UNet_test"], 0.9
    net = UNet(cfg)  # real init: this is the path train.py takes
    x, _, y = _inputs(cfg, B=8)
    sigma = (torch.randn(8) * 1.2 - 0.6).exp()[:, None, None, None]  # ln sigma ~ N(-0.6, 1.2)
    n = torch.randn_like(x) * sigma

    def loss_fn():
        s2 = sigma**2 + sd**2
        c_in, c_skip, c_out = 1 / s2.sqrt(), sd**2 / s2, sigma * sd / s2.sqrt()  # EDM Table 1
        F_x, _ = net(c_in * (x + n), sigma.flatten().log() / 4, y)
        D = c_skip * (x + n) + c_out * F_x
        return ((sigma**2 + sd**2) / (sigma * sd) ** 2 * (D - x) ** 2).mean()

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    before = loss_fn()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert after < before


# -----------------------------------------------------------------------------
# Independent reference: diffusers' UNet2DConditionModel (test-only dependency)


def _diffusers_kwargs(cfg):
    """UNet2DConditionModel arguments for the same layout as UNetConfig cfg."""
    ch = [cfg.base_channels * m for m in cfg.channel_mult]
    has_attn = [d > 0 for d in cfg.transformer_depth]
    if cfg.block_type == "sd":
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn]
        mid, extra = "UNetMidBlock2DCrossAttn", dict(use_linear_projection=True)
        # diffusers' "attention_head_dim" is the number of heads for these blocks (a legacy name);
        # its middle block takes the last entry of transformer_layers_per_block.
        extra["attention_head_dim"] = [c // cfg.head_dim for c in ch]
        extra["transformer_layers_per_block"] = [d or 1 for d in cfg.transformer_depth[:-1]] + [cfg.mid_depth]
        assert cfg.transformer_depth[-1] in (0, cfg.mid_depth)
    else:
        down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in has_attn]
        mid = "UNetMidBlock2DSimpleCrossAttn"
        extra = dict(attention_head_dim=cfg.head_dim, resnet_time_scale_shift="scale_shift")
    up = [b.replace("Down", "Up").replace("Downsample", "Upsample") for b in reversed(down)]
    return dict(sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                block_out_channels=ch, down_block_types=down, up_block_types=up, mid_block_type=mid,
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.caption_dim,
                norm_num_groups=cfg.norm_groups, act_fn="silu", **extra)


RENAMES = [  # our state-dict names -> diffusers' names
    (r"^t_embedder\.0\.", "time_embedding.linear_1."), (r"^t_embedder\.2\.", "time_embedding.linear_2."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"^down\.(\d+)\.res\.", r"down_blocks.\1.resnets."), (r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.res\.", r"up_blocks.\1.resnets."), (r"^up\.(\d+)\.attn\.", r"up_blocks.\1.attentions."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid\.res\.", "mid_block.resnets."), (r"^mid\.attn\.", "mid_block.attentions."),
    (r"\.emb_proj\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."), (r"\.blocks\.", ".transformer_blocks."),
    (r"\.to_out\.", ".to_out.0."), (r"\.ff\.proj\.", ".ff.net.0.proj."), (r"\.ff\.out\.", ".ff.net.2."),
    (r"\.add_k\.", ".add_k_proj."), (r"\.add_v\.", ".add_v_proj."),
]


def _to_diffusers(name, block_type):
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    if block_type == "if":  # IF attention's GroupNorm is "group_norm" in diffusers
        name = re.sub(r"attentions\.(\d+)\.norm\.", r"attentions.\1.group_norm.", name)
    return name


PARITY_CFGS = {
    "sdxl_like": TEST_CFGS["sdxl_3level"],
    "sd2_like": dataclasses.replace(TEST_CFGS["sdxl_3level"], transformer_depth=(1, 1, 0), mid_depth=1),
    "if_like": dataclasses.replace(TEST_CFGS["sdxl_3level"], block_type="if", transformer_depth=(1, 1, 0), mid_depth=1),
}


@pytest.mark.parametrize("kind", list(PARITY_CFGS))
def test_matches_diffusers_forward(kind):
    diffusers = pytest.importorskip("diffusers")
    cfg = PARITY_CFGS[kind]
    ours = _randomize(UNet(cfg)).eval()
    ref = diffusers.UNet2DConditionModel(**_diffusers_kwargs(cfg)).eval()
    sd = {_to_diffusers(k, cfg.block_type): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(sd, strict=True)  # same names and shapes, nothing left over on either side
    x, c_noise, y = _inputs(cfg)
    with torch.no_grad():
        out, _ = ours(x, c_noise, y)
        expected = ref(x, c_noise, encoder_hidden_states=y).sample
    assert out.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["UNet_SD2_C320", "UNet_IF_XL_C512", "UNet_SDXL_C320", "UNet_TD4_4"])
def test_param_count_equals_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = UNET_PRESETS[name]
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**_diffusers_kwargs(cfg))
    assert param_count(cfg) == sum(p.numel() for p in ref.parameters())
