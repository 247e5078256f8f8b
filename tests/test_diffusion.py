"""EDM (diffusion.py) against its closed forms, and sigma_data carried from training to sampling."""
import json
import math
import os
from dataclasses import asdict

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from checkpoint import load_pretrained
from conftest import BUILTIN16, PIXELS, randomize, run
from diffusion import Denoiser, drop_captions, edm_loss, masked_mean, training_noise
from encoders import latents_to_images, load_encoders
from model import build_model, get_config
from sample import edm_sampler, generate


def batch(B=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g), torch.randn(B, L, 16, generator=g)  # MicroDiT_test's shapes


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return randomize(build_model("MicroDiT_test"), seed=seed)


class ConstNet(torch.nn.Module):
    """F(x) = a constant, to read the preconditioning coefficients off D."""
    cfg = get_config("MicroDiT_test")

    def forward(self, x, c_noise, y, mask_ratio=0.0):
        self.seen = (x, c_noise)
        return torch.full_like(x, 2.0), None


def test_preconditioning_formulas():
    for sd in (0.5, 0.9):
        for s in (0.002, 0.5, 1.0, 80.0):
            x, net = torch.full((1, 3, 8, 8), 1.5), ConstNet()
            D_x, _ = Denoiser(net, sigma_data=sd)(x, torch.tensor([s]), None)
            c_skip = sd ** 2 / (s ** 2 + sd ** 2)  # EDM Table 1
            c_out = s * sd / math.sqrt(s ** 2 + sd ** 2)
            c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
            assert torch.allclose(D_x, torch.full_like(x, c_skip * 1.5 + c_out * 2.0), rtol=1e-6)
            assert torch.allclose(net.seen[0], torch.full_like(x, c_in * 1.5), rtol=1e-6)
            assert torch.allclose(net.seen[1], torch.tensor([math.log(s) / 4]), rtol=1e-6)


def test_denoiser_returns_its_input_as_sigma_goes_to_zero():
    x, y = batch()
    D_x, _ = Denoiser(tiny_net())(x, torch.full((4,), 1e-6), y)
    assert torch.allclose(D_x, x, atol=1e-4)


def test_loss_is_the_weighted_error_of_eq_8():
    # with F = 2 everywhere: D = c_skip (x + n s) + 2 c_out, and the loss is the mean of lambda (D - x)^2
    x, n, s, sd = torch.full((1, 3, 8, 8), 0.3), torch.full((1, 3, 8, 8), -1.0), 0.7, 0.5
    D_x = sd ** 2 / (s ** 2 + sd ** 2) * (0.3 - s) + 2 * s * sd / math.sqrt(s ** 2 + sd ** 2)
    expect = (s ** 2 + sd ** 2) / (s * sd) ** 2 * (D_x - 0.3) ** 2
    loss = edm_loss(Denoiser(ConstNet(), sd), x, None, torch.tensor([s]), n)
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)


def test_masked_patches_carry_no_loss():
    net, (x, y) = tiny_net(), batch()
    torch.manual_seed(1)
    D_x, mask = Denoiser(net)(x, torch.full((4,), 0.5), y, mask_ratio=0.5)
    p = 2  # MicroDiT_test: patch 2 on 8x8 latents, a 4x4 grid of tokens
    dropped = mask.reshape(4, 1, 4, 4).repeat_interleave(p, 2).repeat_interleave(p, 3).bool()  # (B, 1, H, W)

    def loss_and_grads(target):
        net.zero_grad()
        loss = masked_mean((D_x - target) ** 2, mask)
        grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True, allow_unused=True)
        return loss, grads

    l0, g0 = loss_and_grads(x)
    l1, g1 = loss_and_grads(torch.where(dropped, x + 100.0, x))  # change the target on dropped patches
    assert torch.equal(l0, l1)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g0, g1))
    l2, _ = loss_and_grads(torch.where(dropped, x, x + 1.0))  # ...while a kept patch does matter
    assert not torch.isclose(l0, l2)
    # the masked loss is the mean of per-patch errors over kept patches (a direct count)
    per_patch = F.avg_pool2d(((D_x - x) ** 2).mean(1, keepdim=True), p).flatten(1)
    expect = torch.stack([per_patch[b][mask[b] == 0].mean() for b in range(4)]).mean()
    assert torch.allclose(l0, expect)


def test_one_step_reduces_the_loss_and_every_parameter_gets_a_gradient():
    net, (x, y) = tiny_net(), batch(B=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sigma, noise, _ = training_noise(8, x.shape[1:], -0.6, 1.2, 0.0, generator=torch.Generator().manual_seed(0))

    def loss_at(seed):
        torch.manual_seed(seed)  # the token mask
        return edm_loss(Denoiser(net), x, y, sigma, noise, mask_ratio=0.5)

    loss = loss_at(0)
    loss.backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    opt.step()
    with torch.no_grad():
        assert loss_at(0) < loss.detach()


def test_training_noise_and_caption_dropout():
    sigma, noise, keep = training_noise(20_000, (3,), -0.6, 1.2, 0.1, generator=torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean() + 0.6) < 0.03 and abs(sigma.log().std() - 1.2) < 0.03  # ln(sigma) ~ N(-0.6, 1.2)
    assert noise.shape == (20_000, 3) and abs(noise.std() - 1) < 0.02
    assert 0.09 < 1 - keep.float().mean() < 0.11  # about 10% dropped
    y = torch.ones(1000, 3, 2)
    per_sample = drop_captions(y, keep[:1000]).sum(dim=(1, 2))
    assert set(per_sample.tolist()) <= {0.0, 6.0} and torch.equal(per_sample == 0, ~keep[:1000])  # whole captions


# --- sigma_data: from the training config to the sampler ------------------------------------------------------

@pytest.mark.slow
def test_a_model_trained_with_sigma_data_half_is_sampled_with_it(tmp_path):
    run("train.py", "--model=MicroDiT_test", "--sigma_data=0.5", "--dataset_size=64", "--max_steps=2",
        "--batch_size=4", "--eval_n=0", "--val_n=0", "--peak_flops=1e12", f"--data_dir={tmp_path / 'data'}",
        f"--out_dir={tmp_path / 'run'}")
    ckpt = tmp_path / "run" / "ckpt-0000002"
    D, config = load_pretrained(str(ckpt))
    assert D.sigma_data == 0.5 and config["sigma_data"] == 0.5
    prompt = "a small red circle on the left"
    run("sample.py", "--ckpt", tmp_path / "run", "--prompt", prompt, "--steps", 3, "--out", tmp_path / "s")
    png = np.asarray(Image.open(tmp_path / "s" / "000000.png"))
    # the same weights under an explicit sampler with 0.5 give these pixels; with 0.9 they would not
    explicit = {sd: generate(Denoiser(D.net, sd), config, [prompt], steps=3, progress=False)[0] for sd in (0.5, 0.9)}
    assert np.array_equal(png, explicit[0.5]) and not np.array_equal(png, explicit[0.9])
    # and c_skip at sigma = 1 is sd^2 / (1 + sd^2) = 0.2 through the loaded denoiser (F's output set to zero)
    zero_out = Denoiser(ConstNet(), D.sigma_data)
    zero_out.net.forward = lambda x, c_noise, y, mask_ratio=0.0: (torch.zeros_like(x), None)
    assert torch.allclose(zero_out(torch.ones(1, 3, 8, 8), torch.ones(1), None)[0], torch.full((1, 3, 8, 8), 0.2))


def write_old_checkpoint(folder, net, ema, sigma_data):
    """A checkpoint folder exactly as train.py wrote it before sigma_data had a key of its own (and before
    checkpoint.py existed): config.json with the model, encoders and train config, and the two weight files."""
    os.makedirs(folder)
    config = {"model_type": "MicroDiT", "model": asdict(net.cfg), "text_encoder": BUILTIN16, "latents": PIXELS,
              "train": {"model": "MicroDiT_test", "sigma_data": sigma_data, "P_mean": -0.6}, "eval_prompts": []}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, module in (("model", net), ("ema", ema)):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / f"{name}.safetensors")


def test_a_checkpoint_of_the_old_format_loads_and_samples_the_same(tmp_path):
    net, ema = tiny_net(0), tiny_net(1)
    for sd in (0.9, 0.5):
        write_old_checkpoint(tmp_path / f"old{sd}", net, ema, sd)
        D, config = load_pretrained(str(tmp_path / f"old{sd}"))
        assert D.sigma_data == sd and all(torch.equal(a, b) for a, b in zip(D.net.state_dict().values(),
                                                                           ema.state_dict().values()))
        prompts = ["a small red circle on the left", "a large blue square at the top"]
        images = np.stack(generate(D, config, prompts, seed=3, steps=4, progress=False))
        # the sampler on the same EMA weights, with the sigma_data of the old train config and the encoders it names
        text, _ = load_encoders(config)
        x = edm_sampler(Denoiser(ema.eval(), sd), text(prompts), range(3, 5), steps=4)
        assert np.array_equal(images, np.stack(latents_to_images(x, PIXELS)))
