"""MicroDiT, checked against the paper's counts, the official key layout, loops written out and a hand count."""
import json

import pytest
import torch
import torch.nn.functional as F

import model
from conftest import REFERENCE, randomize
from diffusion import Denoiser, edm_loss
from model import ExpertChoiceMoE, build_model, get_config, num_params

REF = REFERENCE / "microdit_xl2_keys.json"  # the 478 names and shapes of the released checkpoints


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(get_config(name, **kw))


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(get_config("MicroDiT_test", **kw))


def batch(cfg, B=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=g)
    y = torch.randn(B, L, cfg.caption_dim, generator=g)
    return x, y


# --- 1, 2, 3: the released architecture -------------------------------------------------------

def test_parameter_counts_match_the_paper():
    assert num_params(meta_model("MicroDiT_XL_2")) == 1_165_442_320
    assert num_params(meta_model("MicroDiT_XL_2", latent_channels=16)) == 1_165_540_672
    assert num_params(meta_model("MicroDiT_Tiny_2")) == 200_692_752


def test_state_dict_matches_official_checkpoint_layout():
    ref = json.load(open(REF))
    net = meta_model("MicroDiT_XL_2", latent_size=64, pos_interp_scale=2.0)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert len(ours) == len(ref) == 478
    assert ours == ref
    assert ours["blocks.1.attn.qkv.weight"] == [1920, 1024]
    assert ours["patch_mixer.1.mlp.w1"] == [8, 768, 3072]


def test_strict_load_of_an_official_style_state_dict():
    # a state dict saved by one instance loads strictly into a fresh one, buffers included
    a, b = tiny(), build_model(get_config("MicroDiT_test"))
    b.load_state_dict(randomize(a).state_dict(), strict=True)
    x, y = batch(a.cfg)
    assert torch.equal(a(x, torch.zeros(4), y)[0], b(x, torch.zeros(4), y)[0])


def test_layer_wise_scaling_widths():
    net = meta_model("MicroDiT_XL_2")
    widths = [b.attn.proj.in_features for b in net.blocks]
    # the official dit.py's MicroDiT_XL_2: qkv ratios linspace(0.5, 1.0, 28) of width 1024, head_dim 64
    expected = [512] + [640] * 6 + [768] * 7 + [896] * 7 + [1024] * 7
    assert widths == expected
    assert [b.attn.heads for b in net.blocks] == [w // 64 for w in expected]
    # FFN hidden sizes and the MoE placement (odd blocks, last dense) against the official key list
    ref = json.load(open(REF))
    for i, b in enumerate(net.blocks):
        if f"blocks.{i}.mlp.w1" in ref:
            assert isinstance(b.mlp, ExpertChoiceMoE) and i % 2 == 1 and i != 27
            assert list(b.mlp.w1.shape) == ref[f"blocks.{i}.mlp.w1"]
        else:
            assert list(b.mlp.w1.weight.shape) == ref[f"blocks.{i}.mlp.w1.weight"]
    assert net.blocks[27].mlp.w1.weight.shape[0] == 2816  # round_up_256(int(2 * 4096 / 3))


def test_ablation_switches():
    dense = meta_model("MicroDiT_XL_2", num_experts=0)
    assert not any(isinstance(m, ExpertChoiceMoE) for m in dense.modules())
    uniform = meta_model("MicroDiT_XL_2", qkv_ratio=(1.0, 1.0), mlp_ratio=(4.0, 4.0))
    assert {b.attn.proj.in_features for b in uniform.blocks} == {1024}
    naive = meta_model("MicroDiT_XL_2", mixer_depth=0)
    assert not hasattr(naive, "patch_mixer")
    net = tiny(mixer_depth=0, num_experts=0)  # and it still runs with masking
    x, y = batch(net.cfg)
    out, mask = net(x, torch.zeros(4), y, mask_ratio=0.5)
    assert out.shape == x.shape and mask.sum(1).tolist() == [8.0] * 4


def test_pos_embed_is_the_2d_sincos_layout():
    net = tiny()
    D, g = net.cfg.dim, net.cfg.latent_size // net.cfg.patch_size
    pe = net.pos_embed[0]
    # token t = row * g + col; first half encodes col as [sin(col w_k), cos(col w_k)], second half row
    w = 1 / 10000 ** (torch.arange(D // 4) / (D / 4))
    t = 1 * g + 3  # row 1, col 3
    assert torch.allclose(pe[t, :D // 4], torch.sin(3 * w), atol=1e-6)
    assert torch.allclose(pe[t, D // 4:D // 2], torch.cos(3 * w), atol=1e-6)
    assert torch.allclose(pe[t, D // 2:3 * D // 4], torch.sin(1 * w), atol=1e-6)
    half = build_model(get_config("MicroDiT_test", latent_size=16, pos_interp_scale=2.0))
    # 512px model: coordinates 0, 0.5, 1, ...: token (row 2, col 6) sits where (1, 3) sits at 256px
    assert torch.allclose(half.pos_embed[0, 2 * 2 * g + 6], pe[t], atol=1e-6)


# --- 4: masking -------------------------------------------------------------------------------

def test_backbone_sees_only_kept_tokens():
    cfg = get_config("MicroDiT_test", latent_size=32)  # 16x16 = 256 tokens
    net = build_model(cfg)
    seen = []
    net.blocks[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    net.patch_mixer[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    x, y = batch(cfg, B=2)
    out, mask = net(x, torch.zeros(2), y, mask_ratio=0.75)
    assert seen == [256, 64]  # the mixer sees all 256 tokens, the backbone 64
    assert out.shape == x.shape and mask.shape == (2, 256) and (mask.sum(1) == 192).all()


def test_mask_ratio_zero_equals_the_unmasked_path(monkeypatch):
    # the masking path that keeps every token (shuffled) must reproduce the plain path exactly:
    # gather, backbone, mask-token fill and unshuffle are then a pure permutation round trip
    net = randomize(tiny())
    x, y = batch(net.cfg)
    c = torch.randn(4)
    plain, mask = net(x, c, y, mask_ratio=0.0)
    assert mask is None
    keep_all = model.mask_tokens
    monkeypatch.setattr(model, "mask_tokens", lambda t, n: keep_all(t, t.shape[1]))
    shuffled, mask = net(x, c, y, mask_ratio=0.5)
    assert mask.sum() == 0
    assert torch.allclose(plain, shuffled, atol=1e-5)


# --- 5: expert choice -------------------------------------------------------------------------

def moe_reference(moe, x):
    """Expert choice written out with loops, one sample and one expert at a time."""
    B, T, D = x.shape
    k = int(moe.capacity * T / moe.num_experts)
    out = torch.zeros_like(x)
    for b in range(B):
        probs = torch.softmax(x[b] @ moe.gate.weight.T, dim=-1)  # (T, E)
        for e in range(moe.num_experts):
            g, idx = probs[:, e].topk(k)
            for gi, t in zip(g, idx):
                out[b, t] += gi * (F.gelu(x[b, t] @ moe.w1[e]) @ moe.w2[e])
    return out


def test_expert_choice_capacity_and_reference():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(dim=16, hidden=32, num_experts=4, capacity=2.0)
    for w in (moe.w1, moe.w2):
        torch.nn.init.normal_(w, std=0.2)
    x = torch.randn(3, 10, 16)
    g, idx = moe.route(x)
    assert idx.shape == (3, 4, int(2.0 * 10 / 4))  # each expert: exactly int(capacity*T/E) = 5 tokens
    assert all(len(set(row.tolist())) == 5 for row in idx.reshape(-1, 5))  # distinct tokens
    assert torch.allclose(moe(x), moe_reference(moe, x), atol=1e-5)


def test_routing_is_independent_of_the_other_samples():
    net = randomize(tiny())
    x, y = batch(net.cfg)
    c = torch.randn(4)
    a, _ = net(x, c, y)
    x2, y2 = x.clone(), y.clone()
    x2[1:], y2[1:] = torch.randn_like(x2[1:]), torch.randn_like(y2[1:])
    b, _ = net(x2, c, y2)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    alone, _ = net(x[:1], c[:1], y[:1])
    assert torch.allclose(a[0], alone[0], atol=1e-5)


# --- 7: bf16 autocast and torch.compile on CPU ------------------------------------------------

def test_bf16_autocast_forward_backward():
    net = randomize(tiny())
    x, y = batch(net.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = edm_loss(Denoiser(net), x, y, torch.full((4,), 0.5), torch.randn_like(x), mask_ratio=0.5)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.slow
def test_torch_compile_forward_backward(monkeypatch):
    # one compiled graph, forward and backward, against eager with the same noise and mask
    # (fallback_random: the compiled graph draws the mask from eager's RNG, so both see the same one)
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # scalar C++ kernels compile in half the time of vectorised ones, and one mixer block instead of two
    # still has every kind of block (mixer, dense and MoE backbone): what is tested is that the graph of
    # masking and routing compiles and matches eager, not inductor's code generation
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", False)
    net = randomize(tiny(mixer_depth=1))
    x, y = batch(net.cfg)
    compiled = torch.compile(net)
    losses, grads = [], []
    for m in (net, compiled):
        m.zero_grad()
        torch.manual_seed(0)
        loss = edm_loss(Denoiser(m), x, y, torch.full((4,), 0.5), torch.randn_like(x), mask_ratio=0.5)
        loss.backward()
        losses.append(loss.detach())
        grads.append(net.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(losses[0], losses[1], rtol=1e-4)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


# --- FLOPs --------------------------------------------------------------------------------------

def hand_count(cfg, L):
    """Forward FLOPs of a dense, mixer-free MicroDiT counted by hand: 2 per multiply-accumulate."""
    D, T, Dy, ppC = cfg.dim, (cfg.latent_size // cfg.patch_size) ** 2, cfg.caption_dim, cfg.patch_size ** 2 * cfg.latent_channels
    f = 2 * T * ppC * D  # patch embedding
    f += 2 * (512 * D + D * D) + 2 * (D * D + D * D)  # timestep MLP, pooled caption MLP
    h = model.ffn_hidden(D, 4.0, cfg.multiple_of, moe=False)
    f += 2 * L * (Dy * D + D * D) + 2 * L * 4 * D * D + 4 * L * L * D + 2 * L * 3 * D * h  # caption path
    for a, h, _ in model.layer_widths(cfg):
        f += 2 * D * 6 * D  # adaLN
        f += 2 * T * 4 * D * a + 4 * T * T * a  # self-attention: qkv + proj, QK^T and AV
        f += 2 * T * 2 * D * D + 2 * L * 2 * D * D + 4 * T * L * D  # cross-attention
        f += 2 * T * 3 * D * h  # SwiGLU
    return f + 2 * D * 2 * D + 2 * T * D * ppC  # final layer


@pytest.mark.slow
def test_flop_counter_matches_a_hand_count():
    cfg = get_config("MicroDiT_XL_2", num_experts=0, mixer_depth=0)
    fwd = model.flops_per_image(cfg, 0.0, train=False, caption_len=77)
    assert fwd == hand_count(cfg, 77)
    assert abs(model.flops_per_image(cfg, 0.0) / fwd - 3.0) < 0.01  # backward = 2x forward
    # masking at 0.75 drops 3/4 of the backbone's tokens, but the mixer still sees them all
    f0, f75 = model.flops_per_image("MicroDiT_XL_2", 0.0), model.flops_per_image("MicroDiT_XL_2", 0.75)
    assert 2.0 < f0 / f75 < 4.0
