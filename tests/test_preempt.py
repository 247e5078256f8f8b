"""Reliability of train.py: a signal mid-run, a corrupt newest checkpoint, and non-finite losses."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import diffusion
import train
from checkpoint import read_checkpoint
from conftest import ENV, ROOT
from test_train import tiny_config

pytestmark = pytest.mark.slow  # the full tier: real signals to real runs, and resumes compared bit for bit


def same_files(a, b, names=("model.safetensors", "ema.safetensors", "state.safetensors")):
    """Every tensor of the named files of checkpoint folders a and b is bitwise equal."""
    for name in names:
        x, y = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


# --- a signal mid-run, then --resume=auto ------------------------------------------------------------

def argv(data_dir, out_dir, **kw):
    cfg = dict(model="MicroDiT_test", data_dir=data_dir, dataset_size=200, batch_size=8, max_steps=30, warmup_steps=2,
               log_every=1, ckpt_every=1000, eval_n=0, val_n=16, peak_flops=1e12, threads=1, out_dir=out_dir,
               unmasked_steps=0)  # the switch to unmasked steps depends on max_steps, which these runs vary
    cfg.update(kw)
    return [sys.executable, str(ROOT / "train.py")] + [f"--{k}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(data folder, checkpoint folder) of an uninterrupted 30-step run."""
    tmp = tmp_path_factory.mktemp("straight")
    subprocess.run(argv(tmp / "data", tmp / "run"), env=ENV, check=True, capture_output=True, timeout=300)
    return tmp / "data", tmp / "run" / "ckpt-0000030"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_then_resume_is_bitwise_exact(tmp_path, straight, sig):
    data_dir, expected = straight
    p = subprocess.Popen(argv(data_dir, tmp_path), env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = ""
    for line in p.stdout:  # wait until training is under way
        out += line
        if line.startswith("step      3/"):
            break
    p.send_signal(sig)
    out += p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    k = int(re.search(r"stopped by signal at step (\d+)", out)[1])
    # said at once, before the step in flight was finished and saved
    said = f"{signal.Signals(sig).name}: finishing step {k}, then writing a checkpoint"
    assert said in out and out.index(said) < out.index("stopped by signal"), out
    assert ("press Ctrl-C again to stop without one" in out) == (sig == signal.SIGINT)
    assert 3 <= k < 30 and sorted(os.listdir(tmp_path)) == [f"ckpt-{k:07d}", "log.jsonl"]

    p = subprocess.run(argv(data_dir, tmp_path, resume="auto"), env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"resumed from {tmp_path / f'ckpt-{k:07d}'} at step {k}" in p.stdout, p.stdout
    assert same_files(tmp_path / "ckpt-0000030", expected)


# --- a corrupt newest checkpoint -----------------------------------------------------------------------

def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    train.train(tiny_config(tmp_path))  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    shutil.copytree(run / "ckpt-0000006", tmp_path / "good-6")
    with open(run / "ckpt-0000006" / "model.safetensors", "r+b") as f:  # a write cut short by the machine dying
        f.truncate(os.path.getsize(run / "ckpt-0000006" / "model.safetensors") // 2)
    os.makedirs(run / "ckpt-0000009.tmp")  # an interrupted atomic write: never considered
    shutil.copytree(run / "ckpt-0000003", run / "ckpt-0000008")  # no state.json: weights only, cannot resume
    os.remove(run / "ckpt-0000008" / "state.json")
    capsys.readouterr()

    train.train(tiny_config(tmp_path, resume="auto"))
    out = capsys.readouterr().out
    assert f"warning: checkpoint {run / 'ckpt-0000008'} does not load (FileNotFoundError" in out
    assert f"warning: checkpoint {run / 'ckpt-0000006'} does not load" in out and "ckpt-0000009" not in out
    assert f"resumed from {run / 'ckpt-0000003'} at step 3" in out
    assert same_files(run / "ckpt-0000006", tmp_path / "good-6")  # steps 4-6 redone exactly


def test_explicit_resume_of_a_corrupt_checkpoint_is_an_error(tmp_path):
    train.train(tiny_config(tmp_path, max_steps=3))
    (tmp_path / "run" / "ckpt-0000003" / "state.json").write_text('{"step": 3, "sampl')
    with pytest.raises(ValueError):  # json's error, no fallback: the user named this checkpoint
        train.train(tiny_config(tmp_path, resume=str(tmp_path / "run" / "ckpt-0000003")))


# --- non-finite losses ---------------------------------------------------------------------------------

def nan_at(monkeypatch, steps):
    """Make the training loss NaN at the given 1-based steps (one loss call per step: no accumulation)."""
    calls, real = [0], diffusion.masked_mean

    def masked_mean(err, mask):
        calls[0] += 1
        loss = real(err, mask)
        return loss * float("nan") if calls[0] in steps else loss
    monkeypatch.setattr(diffusion, "masked_mean", masked_mean)


def test_a_nan_loss_skips_the_step(tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {4, 5})
    train.train(tiny_config(tmp_path, max_steps=7, ckpt_every=1, keep_ckpts=10))
    assert "step      4 | non-finite loss or gradient: skipped (1 in a row)" in capsys.readouterr().out
    ckpt = lambda s: tmp_path / "run" / f"ckpt-{s:07d}"
    # steps 4 and 5 changed nothing: not the weights, not the EMA, not the AdamW moments; step 6 did
    assert same_files(ckpt(3), ckpt(4)) and same_files(ckpt(3), ckpt(5)) and not same_files(ckpt(5), ckpt(6))
    state = read_checkpoint(ckpt(7))["state"]
    assert (state["step"], state["skipped"]) == (7, 2)


def test_repeated_nans_stop_the_run_and_leave_finite_checkpoints(tmp_path, monkeypatch):
    nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(RuntimeError, match="3 steps in a row with a non-finite loss or gradient"):
        train.train(tiny_config(tmp_path, max_steps=20, ckpt_every=1, keep_ckpts=100, max_bad_steps=3))
    folders = sorted(os.listdir(tmp_path / "run"))
    assert folders[-1] == "log.jsonl" and folders[-2] == "ckpt-0000004"  # stopped at the 3rd bad step (step 5)
    for d in folders[:-1]:
        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / d / "model.safetensors").values())


def test_non_finite_weights_are_never_saved(tmp_path):
    # an lr beyond float32's range turns the weights into inf/NaN with a finite loss: the checkpoint is refused
    with pytest.raises(RuntimeError, match="non-finite weights; not writing a checkpoint"):
        train.train(tiny_config(tmp_path, lr=1e300, max_steps=2, ckpt_every=1))
    assert [d for d in os.listdir(tmp_path / "run") if d.startswith("ckpt-")] == []


def test_a_signal_to_the_whole_process_group_spares_the_data_workers(tmp_path, straight):
    # Ctrl-C in a terminal (or a cluster's preemption) signals every process of the group, DataLoader workers too
    p = subprocess.Popen(argv(straight[0], tmp_path, num_workers=1), env=ENV, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    out = ""
    for line in p.stdout:
        out += line
        if line.startswith("step      3/"):
            break
    os.killpg(p.pid, signal.SIGINT)
    out += p.communicate(timeout=120)[0]
    assert p.returncode == 0 and "stopped by signal" in out, out
    assert any(d.startswith("ckpt-") for d in os.listdir(tmp_path))
