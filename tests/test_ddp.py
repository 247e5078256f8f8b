"""torchrun DDP on CPU (gloo): the same losses as one process, and a signal to one rank stops every rank."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
from conftest import ENV, ROOT

pytestmark = pytest.mark.slow  # the full tier: torchrun with two ranks

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def args(tmp_path, out, **kw):
    """A tiny run: 2 data lanes, so 1 and 2 ranks read the same global batches; 4 images per forward pass."""
    cfg = dict(model="MicroDiT_test", dataset="shards", data_dir=tmp_path / "data", batch_size=8, micro_batch=4,
               data_lanes=2, max_steps=4, warmup_steps=2, log_every=1, ckpt_every=1000, eval_n=0, val_n=16,
               peak_flops=1e12, threads=1, out_dir=tmp_path / out, unmasked_steps=0)
    cfg.update(kw)
    return [str(ROOT / "train.py")] + [f"--{k}={v}" for k, v in cfg.items()]


def torchrun(argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + argv


def run_cmd(cmd):
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def losses(folder):
    return [r["loss"] for r in map(json.loads, open(folder / "log.jsonl")) if "loss" in r]


@pytest.fixture
def dataset(tmp_path):
    # 8 shards of 25 records: enough for 2 lanes (the default single shard of 4096 can feed only one)
    data.make_shapes_dataset(str(tmp_path / "data"), 200, res=8, shard_size=25, text_dim=16, val=16)


def test_two_ranks_match_one_process(tmp_path, dataset):
    # mask ratio 0: the token masks are drawn inside the model from a per-rank RNG (see train.py)
    run_cmd([sys.executable] + args(tmp_path, "single", mask_ratio=0.0))  # 1 rank x 2 accumulation x 4
    out = run_cmd(torchrun(args(tmp_path, "ddp", mask_ratio=0.0)))  # 2 ranks x 1 accumulation x 4
    assert "batch 8 = 2 ranks x 1 accumulation x 4 micro-batch" in out
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 4 and one[0] != one[-1]
    assert one == pytest.approx(two, abs=1e-5)
    a, b = load_file(tmp_path / "single" / "ckpt-0000004" / "model.safetensors"), \
        load_file(tmp_path / "ddp" / "ckpt-0000004" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def rank_pids(parent):
    """{rank: pid} of the workers torchrun started (its child processes), read from their environment."""
    pids = {}
    for task in os.listdir(f"/proc/{parent}/task"):
        for pid in open(f"/proc/{parent}/task/{task}/children").read().split():
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
            if "RANK" in env:
                pids[int(env["RANK"])] = int(pid)
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path, dataset):
    # a constant lr: the cosine's shape depends on max_steps, which differs between the runs below
    p = subprocess.Popen(torchrun(args(tmp_path, "stopped", max_steps=300, lr_schedule="constant")), env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = ""
    for line in p.stdout:  # wait until training is under way
        out += line
        if line.startswith("step      3/"):
            break
    pids = rank_pids(p.pid)
    os.kill(pids[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it through the stop flag's all-reduce
    out += p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    k = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    assert 3 <= k < 300 and sorted(os.listdir(tmp_path / "stopped")) == [f"ckpt-{k:07d}", "log.jsonl"]

    # resuming on 2 ranks ends bitwise where an uninterrupted 2-rank run ends
    run_cmd(torchrun(args(tmp_path, "stopped", max_steps=k + 2, lr_schedule="constant", resume="auto")))
    run_cmd(torchrun(args(tmp_path, "straight", max_steps=k + 2, lr_schedule="constant")))
    for name in ("model.safetensors", "state.safetensors"):
        a = load_file(tmp_path / "stopped" / f"ckpt-{k + 2:07d}" / name)
        b = load_file(tmp_path / "straight" / f"ckpt-{k + 2:07d}" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
