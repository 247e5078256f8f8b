"""The sweep and the ablations: the flags each train.py run gets, equal FLOPs across variants, resume, a real run."""
import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

import experiments
import scaling
from conftest import ROOT
from model import PRESETS, flops_per_image


def test_sweep_rows_flags_and_resume(tmp_path, monkeypatch):
    import train
    known = {f.name for f in fields(train.TrainConfig)}
    calls = []

    def fake_train(cmd, **kw):  # stands in for a train.py run: writes the closing record train.py logs
        flags = dict(a[2:].split("=", 1) for a in cmd[2:])
        assert cmd[1] == "train.py" and set(flags) <= known, set(flags) - known
        calls.append(flags)
        os.makedirs(flags["out_dir"], exist_ok=True)
        with open(os.path.join(flags["out_dir"], "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": 1, "loss": 9.0}) + "\n")
            f.write(json.dumps({"final": True, "val_loss": 1.5, "acc_shape": 0.3, "acc_colour": 0.6,
                                "acc_position": 0.9}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(experiments.subprocess, "run", fake_train)
    out = str(tmp_path / "results.jsonl")
    kw = dict(models=["MicroDiT_test"], batch_size=8, mask_ratio=0.5, run_root=str(tmp_path / "runs"))
    experiments.sweep(out, steps_list=[2, 4], **kw)
    experiments.sweep(out, steps_list=[2, 4, 8], **kw)  # resumes: only the new budget runs
    assert [c["max_steps"] for c in calls] == ["2", "4", "8"]
    rows = scaling.load_rows(out, scaling.RESULT_KEYS)
    f_img = flops_per_image(PRESETS["MicroDiT_test"], 0.5, caption_len=24)  # the built-in text encoder: 24 tokens
    for r, steps in zip(rows, [2, 4, 8]):
        assert r["steps"] == steps and r["images"] == 8 * steps and r["flops"] == f_img * 8 * steps
        assert r["final_loss"] == 1.5 and r["acc_mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown presets"):
        experiments.sweep(out, models=["nope"])


# -----------------------------------------------------------------------------
# ablations


def test_ablation_runs_get_equal_flops():
    runs = experiments.ablation_runs(list(experiments.ABLATION_TABLES), seeds=(0, 1))
    f = lambda m: flops_per_image(PRESETS["MicroDiT_S"], m, caption_len=24)
    budget = (900 * f(0.75) + 100 * f(0.0)) * 32  # MicroDiT_S at 75% masking, 1,000 steps of 32, the last 100 unmasked
    assert runs["deferred75_s0"]["steps"] == 1000 and runs["deferred75_s0"]["unmasked_steps"] == 100
    assert runs["deferred75_s1"]["flops"] == pytest.approx(budget, rel=1e-12)
    assert {r["variant"] for r in runs.values()} == set(experiments.VARIANTS) and len(runs) == 2 * len(experiments.VARIANTS)
    for name, r in runs.items():
        frac = {"quarter": 0.25, "half": 0.5}.get(r["variant"], 1.0)
        assert r["flops"] == pytest.approx(frac * budget, rel=0.01), name  # whole steps: UNet_S's 150 are 0.7% each
    # what each variant changes: no patch-mixer parameters, no experts, an unmasked model of the base's step cost
    assert runs["naive75_s0"]["params"] < runs["deferred75_s0"]["params"] and runs["nomask_s0"]["mask_ratio"] == 0
    assert runs["dense_s0"]["params"] < runs["deferred75_s0"]["params"]
    small = runs["small_s0"]
    assert small["mask_ratio"] == small["unmasked_steps"] == 0
    assert abs(small["flops"] / small["images"] / f(0.75) - 1) < 0.1
    assert runs["mask25_s0"]["unmasked_steps"] == round(0.1 * runs["mask25_s0"]["steps"])
    assert runs["unet_s0"]["model"] == "UNet_S" and runs["unet_s0"]["mask_ratio"] == 0
    with pytest.raises(ValueError, match="unknown tables"):
        experiments.ablation_runs(["maskng"], seeds=(0,))


def test_ablate_end_to_end(tmp_path):
    # two real train.py runs (dense and MoE), two steps each, then the table; a second call repeats nothing
    out = tmp_path / "ablations.jsonl"
    cmd = [sys.executable, "experiments.py", "ablate", f"--out={out}", "--tables=moe", "--seeds=0", "--base-steps=2",
           f"--run-root={tmp_path / 'runs'}", f"--data-root={tmp_path / 'data'}", "--dataset-size=64",
           "--train-args=--eval_n=2 --eval_steps=2 --val_n=8"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    rows, plan = scaling.load_rows(out, experiments.ABLATION_KEYS), experiments.ablation_runs(["moe"], seeds=(0,), base_steps=2)
    assert sorted(r["run"] for r in rows) == ["deferred75_s0", "dense_s0"]
    for r in rows:
        assert r["steps"] == plan[r["run"]]["steps"] and r["flops"] == plan[r["run"]]["flops"]
        assert np.isfinite(r["final_loss"]) and 0 <= r["acc_mean"] <= 1
        log = [json.loads(line) for line in open(tmp_path / "runs" / r["run"] / "log.jsonl")]
        assert log[-1]["final"] and log[-1]["step"] == r["steps"] and log[-1]["val_loss"] == r["final_loss"]
    assert "| expert-choice MoE, every 2nd block |" in p.stdout and "| dense FFN |" in p.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "(2 already in" in again.stdout and len(scaling.load_rows(out, experiments.ABLATION_KEYS)) == 2
