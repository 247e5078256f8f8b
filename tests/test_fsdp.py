"""FSDP2 and activation checkpointing on CPU (gloo): the same losses as one process, checkpoints that resume
across world sizes and samplers, and recomputation that changes nothing but memory."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
from conftest import ENV, ROOT, randomize, run
from diffusion import Denoiser, edm_loss, training_noise
from model import build_model
from parallel import checkpoint_blocks

pytestmark = pytest.mark.slow  # the full tier: torchrun with two ranks, FSDP2

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def args(tmp_path, out, **kw):
    """A tiny run with gradient accumulation: 8 images = 2 ranks x 2 micro-batches x 2 (1 rank: x 4)."""
    cfg = dict(model="MicroDiT_test", dataset="shards", data_dir=tmp_path / "data", batch_size=8, micro_batch=2,
               data_lanes=2, max_steps=4, warmup_steps=2, log_every=1, ckpt_every=1000, eval_n=0, val_n=16,
               peak_flops=1e12, threads=1, out_dir=tmp_path / out, unmasked_steps=0)
    cfg.update(kw)
    return [str(ROOT / "train.py")] + [f"--{k}={v}" for k, v in cfg.items()]


def torchrun(argv, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    return p.stdout


def losses(folder):
    return [r["loss"] for r in map(json.loads, open(folder / "log.jsonl")) if "loss" in r]


def tensors(folder, name):
    return load_file(folder / name)


def close(a, b, tol):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


@pytest.fixture
def dataset(tmp_path):
    data.make_shapes_dataset(str(tmp_path / "data"), 200, res=8, shard_size=25, text_dim=16, val=16)


@pytest.mark.parametrize("model", ["MicroDiT_test", "UNet_test"])
def test_fsdp_matches_one_process_and_its_checkpoint_samples(tmp_path, dataset, model):
    # mask ratio 0: the token masks are drawn per forward pass from each rank's own RNG (as under DDP)
    kw = dict(model=model, mask_ratio=0.0)
    run(*args(tmp_path, "single", **kw))  # 1 rank x 4 accumulation x 2
    out = torchrun(args(tmp_path, "fsdp", fsdp="true", **kw))  # 2 ranks x 2 accumulation x 2, sharded
    assert "batch 8 = 2 ranks x 2 accumulation x 2 micro-batch" in out
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert len(fsdp) == 4 and fsdp == pytest.approx(single, abs=1e-5)
    a, b = tmp_path / "single" / "ckpt-0000004", tmp_path / "fsdp" / "ckpt-0000004"
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):  # gathered whole, same format
        assert close(tensors(a, name), tensors(b, name), 1e-5), name
    # the FSDP checkpoint samples through sample.py as any other
    for ckpt, folder in ((a, "s_single"), (b, "s_fsdp")):
        run("sample.py", "--ckpt", ckpt, "--prompt", "a small red circle on the left", "--steps", 3, "--out",
            tmp_path / folder)
    im = [np.asarray(Image.open(tmp_path / f / "000000.png"), np.int16) for f in ("s_single", "s_fsdp")]
    assert im[0].shape == (8, 8, 3) and np.abs(im[0] - im[1]).max() <= 1


def test_fsdp_resumes_bitwise_after_a_preemption(tmp_path, dataset):
    kw = dict(max_steps=300, lr_schedule="constant")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *args(tmp_path, "stopped", fsdp="true", **kw)], env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = ""
    for line in p.stdout:  # under way
        out += line
        if line.startswith("step      3/"):
            break
    os.killpg(p.pid, signal.SIGTERM)  # a preemption: every rank gets it
    out += p.communicate(timeout=120)[0]
    k = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    assert 3 <= k < 300 and (tmp_path / "stopped" / f"ckpt-{k:07d}").is_dir(), out
    resumed = dict(max_steps=k + 3, lr_schedule="constant", ckpt_every=k + 1)
    torchrun(args(tmp_path, "stopped", fsdp="true", resume="auto", **resumed))
    torchrun(args(tmp_path, "straight", fsdp="true", **resumed))
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        assert close(tensors(tmp_path / "stopped" / f"ckpt-{k + 3:07d}", name),
                     tensors(tmp_path / "straight" / f"ckpt-{k + 3:07d}", name), 0), name  # bitwise


def test_checkpoints_resume_across_fsdp_and_one_process(tmp_path, dataset):
    # an FSDP checkpoint goes on in one process, and a one-process checkpoint under FSDP, ending where the
    # uninterrupted run ends (mask ratio 0: the token masks are drawn per rank)
    kw = dict(max_steps=6, ckpt_every=3, mask_ratio=0.0)
    torchrun(args(tmp_path, "fsdp", fsdp="true", **kw))
    run(*args(tmp_path, "single", **kw))
    resume = {"to_single": lambda argv: run(*argv).stdout, "to_fsdp": lambda argv: torchrun(argv + ["--fsdp=true"])}
    for src, dst in (("fsdp", "to_single"), ("single", "to_fsdp")):
        os.makedirs(tmp_path / dst)
        os.rename(tmp_path / src / "ckpt-0000003", tmp_path / dst / "ckpt-0000003")
        out = resume[dst](args(tmp_path, dst, resume="auto", **kw))
        assert f"resumed from {tmp_path / dst / 'ckpt-0000003'} at step 3" in out
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        ends = [tensors(tmp_path / d / "ckpt-0000006", name) for d in ("fsdp", "to_single", "single", "to_fsdp")]
        assert all(close(ends[0], e, 1e-5) for e in ends[1:]), name


@pytest.mark.parametrize("name, mask", [("MicroDiT_test", 0.5), ("UNet_test", 0.0)])
def test_activation_checkpointing_changes_nothing_but_memory(name, mask):
    torch.manual_seed(0)
    nets = [randomize(build_model(name)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    checkpoint_blocks(nets[1])
    x, y = torch.randn(4, 3, 8, 8), torch.randn(4, 5, 16)
    sigma, noise, _ = training_noise(4, (3, 8, 8), -0.6, 1.2, 0.0, generator=torch.Generator().manual_seed(0))
    results = []
    for net in nets:
        torch.manual_seed(1)  # the token masks
        loss = edm_loss(Denoiser(net), x, y, sigma, noise, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
    assert sorted(nets[0].state_dict()) == sorted(nets[1].state_dict())  # the same checkpoint names


def test_act_ckpt_trains_the_same_run(tmp_path, dataset):
    run(*args(tmp_path, "plain"))
    run(*args(tmp_path, "ckpt", act_ckpt="true"))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    assert close(tensors(tmp_path / "plain" / "ckpt-0000004", "model.safetensors"),
                 tensors(tmp_path / "ckpt" / "ckpt-0000004", "model.safetensors"), 1e-6)
