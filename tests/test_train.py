"""train.py and sample.py: config overrides, exact resume, batch-independent sampling, and a user's run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from model import build_model
from sample import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- config -------------------------------------------------------------------------------------

def test_overrides_are_typed():
    cfg = train.load_config(["--max_steps=7", "--lr=3e-4", "--compile=true", "--bf16=None", "--model=MicroDiT_test"])
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.bf16, cfg.model) == (7, 3e-4, True, None, "MicroDiT_test")
    assert train.load_config(["--bf16=false"]).bf16 is False


@pytest.mark.parametrize("argv, message", [
    (["--max_stepz=3"], "unknown config key --max_stepz"),
    (["--max_steps=three"], "--max_steps: expected int, got 'three'"),
    (["--compile=maybe"], "--compile: expected true or false"),
    (["--lr"], "--lr: give a value"),
])
def test_bad_overrides_name_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        train.load_config(argv)


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "run.py"
    f.write_text("# 8 images x 4 accumulation\nbatch_size = 8 * 4\nlr = 1\nmodel = 'MicroDiT_test'\n")
    cfg = train.load_config([str(f), "--lr=0.5"])
    assert (cfg.batch_size, cfg.lr, cfg.model) == (32, 0.5, "MicroDiT_test")  # the int lr is accepted as float
    bad = tmp_path / "bad.py"
    bad.write_text("batchsize = 8\n")
    with pytest.raises(ValueError, match="bad.py: unknown config key 'batchsize'"):
        train.load_config([str(bad)])
    wrong = tmp_path / "wrong.py"
    wrong.write_text("max_steps = '10'\n")
    with pytest.raises(ValueError, match="wrong.py: max_steps must be"):
        train.load_config([str(wrong)])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        train.load_config([str(tmp_path / "nope.py")])


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.33)
    assert train.lr_at(0, cfg) == pytest.approx(0.1) and train.lr_at(9, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, cfg) == pytest.approx(0.33 + 0.67 * 0.5)  # half way down the cosine
    assert train.lr_at(110, cfg) == pytest.approx(0.33) and train.lr_at(500, cfg) == pytest.approx(0.33)
    cfg.lr_schedule = "constant"
    assert train.lr_at(60, cfg) == 1.0


# --- exact resume ---------------------------------------------------------------------------------

def tiny_config(tmp_path, **kw):
    base = dict(model="MicroDiT_test", data_dir=str(tmp_path / "data"), dataset_size=200, batch_size=8,
                max_steps=6, warmup_steps=2, log_every=2, ckpt_every=3, keep_ckpts=5, eval_n=0, val_n=16,
                peak_flops=1e12, out_dir=str(tmp_path / "run"), threads=1)
    base.update(kw)
    return train.TrainConfig(**base)


def test_resume_is_bitwise_exact(tmp_path):
    train.train(tiny_config(tmp_path))  # 6 steps straight, checkpoints at 3 and 6
    straight = tmp_path / "run"
    # a run stopped at step 3 leaves exactly ckpt-0000003: resume from a copy of it
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(straight / "ckpt-0000003", tmp_path / "resumed" / "ckpt-0000003")
    train.train(tiny_config(tmp_path, out_dir=str(tmp_path / "resumed"), resume="auto"))
    for name in ("model", "ema"):
        a = load_file(straight / "ckpt-0000006" / f"{name}.safetensors")
        b = load_file(tmp_path / "resumed" / "ckpt-0000006" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = load_file(straight / "ckpt-0000003" / "model.safetensors")  # and training did change the weights
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = json.load(open(tmp_path / "resumed" / "ckpt-0000006" / "state.json"))
    assert state["step"] == 6 and state["samples"] == 48


def test_model_and_data_mismatch_is_a_clear_error(tmp_path):
    train.train(tiny_config(tmp_path, max_steps=1))
    cfg = tiny_config(tmp_path, model="MicroDiT_S", dataset="shards")
    with pytest.raises(ValueError, match="model MicroDiT_S expects latents"):
        train.train(cfg)


# --- sampling -------------------------------------------------------------------------------------

def test_an_image_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    net = build_model("MicroDiT_test").eval()
    with torch.no_grad():  # a net that is not the identity at init
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = {"text_encoder": {"type": "builtin", "dim": 16, "max_len": 24}, "latents": {"type": "pixels"}}
    prompts = ["a small red circle on the left", "a large blue square at the top"] * 4
    alone = generate(net, config, [prompts[3]], seed=10 + 3, steps=4, progress=False)[0]
    batch = generate(net, config, prompts, seed=10, steps=4, progress=False)
    assert np.array_equal(alone, batch[3])
    assert not np.array_equal(batch[3], batch[5])  # same prompt, other seed: another image


def test_empty_prompt_is_refused():
    net = build_model("MicroDiT_test")
    config = {"text_encoder": {"type": "builtin", "dim": 16, "max_len": 24}}
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(net, config, ["a red circle", "  "], progress=False)


# --- as a user runs it ------------------------------------------------------------------------------

def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_train_then_sample_end_to_end(tmp_path):
    out = run([os.path.join(ROOT, "train.py"), "--model=MicroDiT_test", "--dataset_size=100", "--max_steps=4",
               "--batch_size=4", "--log_every=2", "--eval_n=4", "--eval_steps=2", "--val_n=8",
               "--peak_flops=1e12", f"--out_dir={tmp_path}/run", f"--data_dir={tmp_path}/data"], tmp_path)
    assert "step      4 | loss" in out and "acc_shape" in out
    ckpt = tmp_path / "run" / "ckpt-0000004"
    assert {"config.json", "model.safetensors", "ema.safetensors", "state.json", "state.safetensors"} <= set(os.listdir(ckpt))
    assert (tmp_path / "run" / "samples-0000004.png").exists()
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["final"] and np.isfinite(log[-1]["val_loss"])

    out = run([os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "run"), "--prompt", "a red circle on the left",
               "--prompt", "a blue square at the top", "--n", "2", "--steps", "3", "--out", str(tmp_path / "samples")],
              tmp_path)
    files = sorted(os.listdir(tmp_path / "samples"))
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "grid.png", "prompts.txt"]
    from PIL import Image
    assert Image.open(tmp_path / "samples" / "000000.png").size == (8, 8)
    assert Image.open(tmp_path / "samples" / "grid.png").size == (16, 16)


def test_sample_without_checkpoint_says_what_to_do(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "no checkpoint at" in p.stderr and "python train.py" in p.stderr
