"""The sweep and the ablations: the flags each train.py run gets, equal FLOPs across variants, resume, a real run."""
import json
import os
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
from PIL import Image

import experiments
import scaling
from conftest import ROOT
from model import PRESETS, flops_per_image

# the full tier (slow): real train.py runs and FLOP counts of every ablation; the fast tier: the curve report


@pytest.mark.slow
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


@pytest.mark.slow
def test_ablation_runs_get_equal_flops():
    first = ["masking", "mask_ratio", "moe", "layer_scaling", "unet", "compute"]  # the tables at MicroDiT_S's C
    runs = experiments.ablation_runs(first, seeds=(0, 1))
    f = lambda m: flops_per_image(PRESETS["MicroDiT_S"], m, caption_len=24)
    budget = (900 * f(0.75) + 100 * f(0.0)) * 32  # MicroDiT_S at 75% masking, 1,000 steps of 32, the last 100 unmasked
    assert runs["deferred75_s0"]["steps"] == 1000 and runs["deferred75_s0"]["unmasked_steps"] == 100
    assert runs["deferred75_s1"]["flops"] == pytest.approx(budget, rel=1e-12)
    variants = {v for t in first for _, v in experiments.ABLATION_TABLES[t][1]}
    assert {r["variant"] for r in runs.values()} == variants and len(runs) == 2 * len(variants) == 22
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


@pytest.mark.slow
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
        t = log[-1]  # the wall clock split: data, training and evaluation inside the whole run
        assert min(t["data_s"], t["train_s"], t["eval_s"]) > 0 and r["train_s"] == t["train_s"]
        assert t["data_s"] + t["train_s"] + t["eval_s"] <= t["wall_s"] + 0.03 < r["wall_s"]  # r: with Python's start
    assert "| expert-choice MoE, every 2nd block |" in p.stdout and "| dense FFN |" in p.stdout
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "(2 already in" in again.stdout and len(scaling.load_rows(out, experiments.ABLATION_KEYS)) == 2


@pytest.mark.slow
def test_new_tables_get_the_budget_their_framing_says():
    # budgets computed here from model.py's counter alone, as a reader would from the README's description
    runs = experiments.ablation_runs(["masking256", "unet_depth", "data"])
    f = lambda model, m, **kw: flops_per_image(replace(PRESETS[model], **kw), m, caption_len=24) * 32
    masked = lambda model, steps, **kw: (steps - round(0.1 * steps)) * f(model, 0.75, **kw) + \
        round(0.1 * steps) * f(model, 0.0, **kw)
    # the curve tables at their budgets: masking256 x2, the deferred run 2 x 250 steps of 32, the last 50
    # unmasked; unet_depth x1, the wider UNet 200 steps
    budget256 = masked("MicroDiT_S_2", 500)
    unet_args = dict(base_channels=24, head_dim=24)
    budget_unet = 200 * f("UNet_S", 0.0, **unet_args)
    seeds = {}
    for name, r in runs.items():
        seeds.setdefault(r["variant"], set()).add(r["seed"])
        if r["variant"] in ("deferred256", "nomask256", "naive256", "small256"):
            assert r["flops"] == pytest.approx(budget256, rel=0.01), name
        elif r["variant"] in ("unet_td", "unet_c"):
            assert r["flops"] == pytest.approx(budget_unet, rel=0.01), name
        if r["variant"] in ("deferred256", "nomask256", "naive256", "small256", "unet_td", "unet_c"):
            # about 8 evaluations along the way, a wsd schedule decaying over the last 20%, the budget named
            budget = 1 if r["variant"].startswith("unet") else 2
            assert name == f"{r['variant']}_x{budget:g}_s{r['seed']}" and r["budget"] == budget, name
            assert r["lr_schedule"] == "wsd", name
            assert r["eval_every"] == r["steps"] // 8 and r["decay_steps"] == round(0.2 * r["steps"]), name
            assert r["eval"] == "eval_n=128,curve_n=16,eval_steps=12" and r["curve_n"] == 16, name
        else:  # the data table scores as the older tables do (train.py's defaults, 128 x 18), under its cosine
            assert name == f"{r['variant']}_s{r['seed']}" and r["eval"] == "" and "lr_schedule" not in r
    assert seeds == {v: {0, 1, 2} for v in seeds} and len(seeds) == 9  # three seeds of every variant
    assert runs["deferred256_x2_s0"]["steps"] == 500 and runs["unet_c_x1_s0"]["steps"] == 200
    assert runs["nomask256_x2_s0"]["steps"] == round(budget256 / f("MicroDiT_S_2", 0.0))
    assert runs["naive256_x2_s0"]["model_args"] == "mixer_depth=0" and runs["naive256_x2_s0"]["steps"] > 500
    # --budget: x1 is the tables' first framing, 250 and 200 steps
    once = experiments.ablation_runs(["masking256", "unet_depth"], seeds=(0,), budget=1)
    assert once["deferred256_x1_s0"]["steps"] == 250 and once["unet_c_x1_s0"]["steps"] == 200
    assert once["deferred256_x1_s0"]["flops"] == pytest.approx(masked("MicroDiT_S_2", 250))
    # what the variants are: 256 tokens; the smaller model's step costs the masked one's within 3%; TD vs C
    assert PRESETS["MicroDiT_S_2"].latent_size // PRESETS["MicroDiT_S_2"].patch_size == 16
    small = dict(dim=64, depth=6, mixer_depth=0)
    assert runs["small256_x2_s0"]["model_args"] == "dim=64,depth=6,mixer_depth=0"
    assert f("MicroDiT_S_2", 0.0, **small) == pytest.approx(f("MicroDiT_S_2", 0.75), rel=0.03)
    td, c = runs["unet_td_x1_s0"], runs["unet_c_x1_s0"]
    assert abs(td["params"] / c["params"] - 1) < 0.03 and "transformer_depth=0:1:5" in td["model_args"]
    # the data table: the deferred75 run's model and steps, on other training sets
    for name in ("deferred75_s2", "partial_captions_s2", "scenes2000_s2"):
        assert runs[name]["steps"] == 1000 and runs[name]["flops"] == pytest.approx(masked("MicroDiT_S", 1000))
    assert runs["partial_captions_s0"]["data"] == "dataset_captions=partial"
    assert runs["scenes2000_s0"]["data"] == "dataset_scenes=2000" and runs["deferred75_s0"]["data"] == ""


@pytest.mark.slow
def test_mixer_share_of_the_new_preset():
    # the mixer's FLOPs counted by calling its modules one by one, against model.py's MIXER regex
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import model
    cfg = PRESETS["MicroDiT_S_2"]
    with torch.device("meta"):  # (on CPU tensors, torch's counter has no formula for the fused attention)
        net = model.build_model(cfg)
        x, y = torch.randn(1, 3, 32, 32), torch.randn(1, 24, 64)
        h = net.x_embedder(x) + net.pos_embed
        yy = net.y_emb_preprocess(net.y_embedder.y_proj(y))
        c = net.t_embedder(torch.zeros(1)) + net.pooled_y_emb_process(yy.mean(1))
        with FlopCounterMode(display=False) as counter:
            h = net.patch_mixer_map_xin(h)
            ym = net.patch_mixer_map_y(yy)
            for block in net.patch_mixer:
                h = block(h, ym, c)
            net.patch_mixer_map_xout(h[:, :64])  # 256 tokens, 75% masked: 64 kept
    mixer = counter.get_total_flops()
    assert mixer == model.flops_per_image(cfg, 0.75, train=False, caption_len=24, part=model.MIXER)
    share = mixer / model.flops_per_image(cfg, 0.75, train=False, caption_len=24)
    assert 0.30 <= share <= 0.45, share  # as MicroDiT_XL_2's (38%): the issue's 30-45%
    xl = model.flops_per_image("MicroDiT_XL_2", 0.75, False, part=model.MIXER) / \
        model.flops_per_image("MicroDiT_XL_2", 0.75, False)
    assert 0.37 < xl < 0.39


# -----------------------------------------------------------------------------
# tune: the default run's knobs


@pytest.mark.slow
def test_tune_runs_each_candidate_as_the_default_with_its_changes(tmp_path, monkeypatch):
    import train
    defaults = {f.name: f.default for f in fields(train.TrainConfig)}
    calls = []

    def fake_train(cmd, **kw):  # a train.py run: the closing record with its wall clock split
        flags = dict(a[2:].split("=", 1) for a in cmd[2:])
        assert set(flags) <= set(defaults), set(flags) - set(defaults)
        calls.append(flags)
        with open(os.path.join(flags["out_dir"], "log.jsonl"), "a") as f:
            f.write(json.dumps({"final": True, "val_loss": 0.01, "acc_shape": 0.9, "acc_colour": 1.0,
                                "acc_position": 0.95, "data_s": 1, "train_s": 2, "eval_s": 3, "wall_s": 6}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(experiments.subprocess, "run", fake_train)
    out, root = str(tmp_path / "tuning.jsonl"), str(tmp_path / "runs")
    experiments.tune(out, ["previous", "half"], seeds=(0, 1), threads=1, run_root=root)
    experiments.tune(out, ["half", "b32"], seeds=(1,), threads=1, run_root=root)  # resumes: only b32_s1 is new
    assert [(c["max_steps"], c["seed"]) for c in calls] == [("2000", "0"), ("2000", "1"), ("800", "0"),
                                                            ("800", "1"), ("1600", "1")]
    half = experiments.TUNING["half"][1]
    assert calls[2] == {**{k: str(v) for k, v in half.items()}, "seed": "0", "threads": "1",
                        "data_dir": f"{root}/half_s0/data", "out_dir": f"{root}/half_s0", "resume": "auto"}
    rows = scaling.load_rows(out, experiments.TUNE_KEYS)
    assert [r["run"] for r in rows] == ["previous_s0", "previous_s1", "half_s0", "half_s1", "b32_s1"]
    assert rows[-1]["batch_size"] == 32 and rows[-1]["acc_mean"] == pytest.approx(0.95) and rows[-1]["eval_s"] == 3
    assert 0 <= rows[-1]["wall_s"] < 5  # the command's own wall clock (here a stand-in's), not train.py's
    table = experiments.tuning_table(rows)
    assert "| half | " in table and "| 800 x 64 |" in table and "| 1 | 2 | 3 | 0 |" in table
    with pytest.raises(ValueError, match="unknown candidates"):
        experiments.tune(out, ["nope"])
    # the knobs a candidate names are TrainConfig fields; `previous` is the default this tuning started from
    assert all(set(knobs) <= set(defaults) for _, knobs in experiments.TUNING.values())
    assert experiments.PREVIOUS["max_steps"] == 2000 and experiments.PREVIOUS["batch_size"] == 64
    # train.py's default is the candidate that met the target, on a preset that is MicroDiT_S without its mixer
    chosen = experiments.TUNING["naive50_b32"][1]
    assert chosen["model"] == "MicroDiT_S" and chosen["model_args"] == "mixer_depth=0"
    assert defaults["model"] == "MicroDiT_S_nomixer" and defaults["model_args"] == ""
    assert PRESETS["MicroDiT_S_nomixer"] == replace(PRESETS["MicroDiT_S"], mixer_depth=0)
    assert {k: defaults[k] for k in chosen if k not in ("model", "model_args")} == {
        k: v for k, v in chosen.items() if k not in ("model", "model_args")}


# -----------------------------------------------------------------------------
# the curve tables: evaluations along each run, FLOPs to an accuracy, a verdict only where it is due


def curve_rows(variant, finals, steps=80, step_flops=1e12, budget=8.0):
    """Synthetic rows of one variant, one per seed: 8 evaluations, the mean accuracy rising linearly to its final."""
    rows = []
    for seed, final in enumerate(finals):
        every = steps // 8
        curve = [dict(step=s, samples=32 * s, flops=s * step_flops, acc_mean=final * s / steps, val_loss=0.1,
                      eval_s=1.0) for s in range(every, steps + 1, every)]
        curve[-1]["final"] = True
        rows.append(dict(run=f"{variant}_x{budget:g}_s{seed}", variant=variant, seed=seed, steps=steps, budget=budget,
                         acc_mean=final, final_loss=0.1, train_s=77.0, curve=curve))
    return rows


def test_curve_report_reads_flops_to_an_accuracy_and_draws_a_verdict_only_where_due(tmp_path):
    # first evaluation that reaches the threshold; a curve that never does: inf
    curve = [dict(step=1, flops=10, acc_mean=0.3), dict(step=2, flops=20, acc_mean=0.6), dict(step=3, flops=30, acc_mean=0.4)]
    assert experiments.flops_to(curve, 0.5) == 20 and experiments.flops_to(curve, 0.8) == np.inf
    verdict = experiments.verdict
    assert verdict({"a": [0.7, 0.75, 0.79], "b": [0.5] * 3}, "a")[0] == "undecided at this budget"  # leader < 0.8
    assert verdict({"a": [0.85, 0.9, 0.95], "b": [0.5, 0.6, 0.7]}, "a")[0] == "reproduced"
    assert verdict({"a": [0.5, 0.6, 0.7], "b": [0.85, 0.9, 0.95]}, "a") == (
        "not reproduced", "every seed of b above every seed of a")
    assert verdict({"a": [0.82, 0.9, 0.95], "b": [0.8, 0.85, 0.88]}, "a") == (  # the gap is within the spread
        "undecided at this budget", "a's seeds overlap those of b")

    # masking256: deferred ahead of naive and no masking, but small256's best seed (0.91) within its range; no
    # masking takes half the steps at twice the FLOPs a step
    rows = (curve_rows("deferred256", [0.9, 0.92, 0.95]) + curve_rows("naive256", [0.6, 0.7, 0.75])
            + curve_rows("small256", [0.5, 0.55, 0.91]) + curve_rows("nomask256", [0.3, 0.4, 0.5], steps=40, step_flops=2e12)
            + curve_rows("deferred256", [0.1] * 3, budget=4.0)  # another budget: reported with --budget=4 only
            + [dict(run="deferred256_s0", variant="deferred256", seed=0, acc_mean=0.2)])  # an older row, no curve
    text = "\n".join(experiments.curve_report("masking256", rows, plot_dir=str(tmp_path)))
    assert "### masking256, budget x8" in text
    # 0.92 x step / 80 reaches 0.5 at step 50 and 0.8 at step 70 (0.9: at 50 and 80; 0.95: at 50 and 70)
    assert ("| deferred 75% masking, patch-mixer | 3 | 80 | 0.920 (0.900-0.950) | 0.1000 | 5e+13 (3/3 seeds) | "
            "7e+13 (3/3 seeds) | 0.460 (step 40) | 7: 10% of the training time |") in text
    assert "| 0.550 (0.500-0.910) | 0.1000 | 8e+13 (3/3 seeds) | not reached (1/3 seeds) |" in text  # small256
    assert "| no masking | 3 | 40 | 0.400 (0.300-0.500) | 0.1000 | not reached (1/3 seeds) |" in text
    assert "Verdict: **undecided at this budget** (deferred256's seeds overlap those of small256)" in text  # 0.91
    image = Image.open(tmp_path / "masking256_curves.png")
    assert image.size[0] < 800 and os.path.getsize(tmp_path / "masking256_curves.png") < 100_000
    # without a variant (or with fewer than 3 seeds of one): no verdict; another budget on request; none: what to run
    text = "\n".join(experiments.curve_report("masking256", [r for r in rows if r["variant"] != "small256"]))
    assert "| smaller model (dim 64, 6 blocks), no masking | not run |" in text
    assert "Verdict: **undecided at this budget** (fewer than 3 seeds of small256)" in text
    assert "| deferred 75% masking, patch-mixer | 3 | 80 | 0.100 (0.100-0.100) |" in "\n".join(
        experiments.curve_report("masking256", rows, budget=4.0))
    assert "No runs with curves at budget x1 yet: `python experiments.py ablate --tables=unet_depth --budget=1`" in \
        "\n".join(experiments.curve_report("unet_depth", rows))
    rows = curve_rows("unet_td", [0.85, 0.9, 0.95]) + curve_rows("unet_c", [0.5, 0.6, 0.7])
    assert "Verdict: **reproduced** (every seed of unet_td above every seed of unet_c)" in "\n".join(
        experiments.curve_report("unet_depth", rows))


@pytest.mark.slow
def test_curve_runs_pass_their_schedule_and_rows_keep_their_curve(tmp_path, monkeypatch):
    import train
    known, calls = {f.name for f in fields(train.TrainConfig)}, []

    def fake_train(cmd, **kw):  # a train.py run: an evaluation every eval_every steps, then the closing record
        flags = dict(a[2:].split("=", 1) for a in cmd[2:])
        assert set(flags) <= known, set(flags) - known
        calls.append(flags)
        steps, every = int(flags["max_steps"]), int(flags["eval_every"])
        with open(os.path.join(flags["out_dir"], "log.jsonl"), "a") as f:
            for s in [*range(every, steps, every), steps]:
                f.write(json.dumps({"step": s, "samples": 32 * s, "flops": 1e9 * s, "val_loss": 0.5, "acc_shape": 0.3,
                                    "acc_colour": 0.6, "acc_position": 0.9, "acc_mean": 0.6, "eval_s": 0.1,
                                    **({"final": True, "train_s": 5.0} if s == steps else {})}) + "\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(experiments.subprocess, "run", fake_train)
    out = str(tmp_path / "rows.jsonl")
    experiments.ablate(out, ["unet_depth"], seeds=(0,), jobs=1, budget=0.1, run_root=str(tmp_path / "runs"),
                       data_root=str(tmp_path / "data"), dataset_size=16, device="cuda")
    plan = experiments.ablation_runs(["unet_depth"], seeds=(0,), budget=0.1)
    assert sorted(plan) == ["unet_c_x0.1_s0", "unet_td_x0.1_s0"] and plan["unet_c_x0.1_s0"]["steps"] == 20
    for flags in calls:  # wsd over the last 20%, ~8 evaluations on 32 captions, the final on 128; the device as given
        steps = int(flags["max_steps"])
        assert (flags["lr_schedule"], flags["decay_steps"], flags["eval_every"]) == ("wsd", str(round(0.2 * steps)),
                                                                                     str(steps // 8))
        assert (flags["curve_n"], flags["eval_n"], flags["eval_steps"], flags["device"]) == ("16", "128", "12", "cuda")
    for r in scaling.load_rows(out, experiments.ABLATION_KEYS):
        assert r["budget"] == 0.1 and r["curve"][-1]["final"] and r["curve"][-1]["step"] == r["steps"]
        assert [p["step"] for p in r["curve"]] == [*range(r["eval_every"], r["steps"], r["eval_every"]), r["steps"]]
        assert r["curve"][0] == {"step": r["eval_every"], "samples": 32 * r["eval_every"], "flops": 1e9 * r["eval_every"],
                                 "val_loss": 0.5, "acc_shape": 0.3, "acc_colour": 0.6, "acc_position": 0.9,
                                 "acc_mean": 0.6, "eval_s": 0.1}


@pytest.mark.slow
def test_a_curve_point_is_at_the_flops_it_claims(tmp_path, monkeypatch):
    # a real train.py run (UNet_test, 4 steps of 4 images, an evaluation at step 2), read as ablate reads it
    monkeypatch.chdir(ROOT)
    results = experiments.run_train(str(tmp_path / "run"), dict(
        model="UNet_test", mask_ratio=0.0, max_steps=4, warmup_steps=1, batch_size=4, lr_schedule="wsd",
        decay_steps=1, eval_every=2, eval_n=2, curve_n=1, eval_steps=2, val_n=4, dataset_size=32,
        data_dir=str(tmp_path / "data"), threads=1, peak_flops=1e12, log_every=2))
    curve = results["curve"]
    assert [(p["step"], p["samples"], p.get("final", False)) for p in curve] == [(2, 8, False), (4, 16, True)]
    f = flops_per_image(PRESETS["UNet_test"], 0.0, caption_len=24) * 4  # model.py's counter: one step of 4 images
    assert all(p["flops"] == pytest.approx(p["step"] * f, rel=0.01) for p in curve)
    assert curve[-1]["acc_mean"] == pytest.approx(results["acc_mean"]) and curve[-1]["val_loss"] == results["final_loss"]
