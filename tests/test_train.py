"""train.py and sample.py: config overrides, exact resume, batch-independent sampling, and a user's run."""
import json
import os
import shutil
import typing
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import config
import train
from config import load_config, model_overrides
from conftest import BUILTIN16, PIXELS, ROOT, run, tiny_denoiser
from diffusion import Denoiser
from model import build_model, get_config
from sample import generate


# --- config -------------------------------------------------------------------------------------

def load(argv):
    return load_config(train.TrainConfig, argv)


def test_overrides_are_typed():
    cfg = load(["--max_steps=7", "--lr=3e-4", "--compile=true", "--bf16=None", "--model=MicroDiT_test"])
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.bf16, cfg.model) == (7, 3e-4, True, None, "MicroDiT_test")
    assert load(["--bf16=false"]).bf16 is False
    cfg = load(["--overwrite", "--compile", "--bf16"])  # a bare switch is true, as argparse's
    assert cfg.overwrite is True and cfg.compile is True and cfg.bf16 is True


@pytest.mark.parametrize("argv, message", [
    (["--max_stepz=3"], "unknown config key --max_stepz"),
    (["--max_steps=three"], "--max_steps: expected int, got 'three'"),
    (["--compile=maybe"], "--compile: expected true or false"),
    (["--lr"], "--lr: give a value"),
])
def test_bad_overrides_name_the_key(argv, message):
    with pytest.raises(ValueError, match=message):
        load(argv)


def test_model_args_override_preset_fields():
    cfg = load(["--model=MicroDiT_S", "--model_args=mixer_depth=0, mlp_ratio=2.5:2.5,bias=true"])
    over = model_overrides(cfg.model_args, get_config(cfg.model))
    assert over == {"mixer_depth": 0, "mlp_ratio": (2.5, 2.5), "bias": True}
    assert type(over["mixer_depth"]) is int and type(over["mlp_ratio"][0]) is float
    with pytest.raises(ValueError, match="'depht=3' is not FIELD=VALUE"):
        train.check_config(load(["--model_args=depht=3"]))
    with pytest.raises(ValueError, match="--model_args dim: expected int, got '1.5'"):
        train.check_config(load(["--model_args=dim=1.5"]))


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "run.py"
    f.write_text("# 8 images x 4 accumulation\nbatch_size = 8 * 4\nlr = 1\nmodel = 'MicroDiT_test'\n")
    cfg = load([str(f), "--lr=0.5"])
    assert (cfg.batch_size, cfg.lr, cfg.model) == (32, 0.5, "MicroDiT_test")  # the int lr is accepted as float
    bad = tmp_path / "bad.py"
    bad.write_text("batchsize = 8\n")
    with pytest.raises(ValueError, match="bad.py: unknown config key 'batchsize'"):
        load([str(bad)])
    wrong = tmp_path / "wrong.py"
    wrong.write_text("max_steps = '10'\n")
    with pytest.raises(ValueError, match="wrong.py: max_steps must be"):
        load([str(wrong)])
    with pytest.raises(config.UsageError, match="config file not found: .*nope.py"):
        load([str(tmp_path / "nope.py")])


def test_a_json_config_sets_fields_by_name_and_other_files_are_refused(tmp_path):
    f = tmp_path / "run.json"
    f.write_text('{"batch_size": 32, "lr": 1, "model": "MicroDiT_test", "bf16": null, "compile": false}')
    cfg = load([str(f), "--lr=0.5"])
    assert (cfg.batch_size, cfg.lr, cfg.model, cfg.bf16, cfg.compile) == (32, 0.5, "MicroDiT_test", None, False)
    for name, text, message in [
            ("typo.json", '{"max_step": 10}', "typo.json: unknown config key 'max_step'"),
            ("type.json", '{"max_steps": "10"}', "type.json: max_steps must be <class 'int'>"),
            ("bool.json", '{"max_steps": true}', "bool.json: max_steps must be"),  # a bool is not an int
            ("list.json", '[1, 2]', "list.json: a JSON config is an object of fields by name, not a list"),
            ("bad.json", '{"lr": 1e-3,\n "max_steps": }', r"bad.json: not valid JSON \(Expecting value: line 2"),
            ("cfg.yaml", "lr: 0.001\n", "cfg.yaml: not a config file: config files are Python .*or JSON")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(config.UsageError, match=message):
            load([str(tmp_path / name)])
    with pytest.raises(config.UsageError, match=r"config file not found: max_steps=5 \(a flag is written "):
        load(["max_steps=5"])


@dataclass
class Tiny:
    steps: int = 3                     # how many steps
    rate: float = 0.5                  # a rate, with a comment
                                       # continued on the next line
    name: typing.Optional[str] = None  # None = unnamed


def test_config_reads_any_dataclass(tmp_path):
    f = tmp_path / "tiny.py"
    f.write_text("steps = 2 * 5\n")
    cfg = load_config(Tiny, [str(f), "--rate=1", "--name=x"])
    assert (cfg.steps, cfg.rate, cfg.name) == (10, 1.0, "x") and type(cfg.rate) is float
    assert config.field_help(Tiny) == {"steps": "how many steps", "name": "None = unnamed",
                                       "rate": "a rate, with a comment continued on the next line"}
    with pytest.raises(ValueError, match=r"unknown config key --step \(python test_train.py --help lists them"):
        load_config(Tiny, ["--step=1"])
    (tmp_path / "none.py").write_text("import os\n")
    with pytest.raises(ValueError, match="none.py: sets no config field .*assigns fields of Tiny"):
        load_config(Tiny, [str(tmp_path / "none.py")])


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
                peak_flops=1e12, out_dir=str(tmp_path / "run"), threads=1, unmasked_steps=2)
    base.update(kw)
    return train.TrainConfig(**base)


@pytest.mark.slow
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


@pytest.mark.slow
def test_zero_steps_saves_and_scores_the_initial_weights(tmp_path):
    train.train(tiny_config(tmp_path, max_steps=0))
    ckpt = tmp_path / "run" / "ckpt-0000000"
    assert (ckpt / "model.safetensors").exists() and "val_loss" in json.loads((ckpt / "config.json").read_text())["results"]


@pytest.mark.slow
def test_unmasked_steps_end_the_run_unmasked(tmp_path, monkeypatch):
    seen, real = [], train.edm_loss
    monkeypatch.setattr(train, "edm_loss", lambda D, x, y, sigma, noise, mask_ratio: seen.append(mask_ratio) or
                        real(D, x, y, sigma, noise, mask_ratio))
    train.train(tiny_config(tmp_path, mask_ratio=0.5, max_steps=5, unmasked_steps=2, val_n=0))
    assert seen == [0.5, 0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="--unmasked_steps=-1: must be >= 0"):
        train.check_config(load(["--unmasked_steps=-1"]))


@pytest.mark.slow
def test_model_and_data_mismatch_is_a_clear_error(tmp_path):
    train.train(tiny_config(tmp_path, max_steps=1))
    cfg = tiny_config(tmp_path, model="MicroDiT_S", dataset="shards", out_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="model MicroDiT_S expects latents"):
        train.train(cfg)


# --- sampling -------------------------------------------------------------------------------------

def test_an_image_does_not_depend_on_its_batch():
    D = tiny_denoiser()  # a net that is not the identity at init
    config = {"text_encoder": BUILTIN16, "latents": PIXELS}
    prompts = ["a small red circle on the left", "a large blue square at the top"] * 4
    alone = generate(D, config, [prompts[3]], seed=10 + 3, steps=4, progress=False)[0]
    batch = generate(D, config, prompts, seed=10, steps=4, progress=False)
    assert np.array_equal(alone, batch[3])
    assert not np.array_equal(batch[3], batch[5])  # same prompt, other seed: another image


def test_empty_prompt_is_refused():
    config = {"text_encoder": BUILTIN16}
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(Denoiser(build_model("MicroDiT_test")), config, ["a red circle", "  "], progress=False)


# --- as a user runs it ------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_then_sample_end_to_end(tmp_path):
    out = run("train.py", "--model=MicroDiT_test", "--dataset_size=100", "--max_steps=4", "--batch_size=4",
              "--log_every=2", "--eval_n=4", "--eval_steps=2", "--val_n=8", "--peak_flops=1e12",
              f"--out_dir={tmp_path}/run", f"--data_dir={tmp_path}/data", cwd=tmp_path).stdout
    assert "step      4/4 | loss" in out and "acc_shape" in out
    ckpt = tmp_path / "run" / "ckpt-0000004"
    assert {"config.json", "model.safetensors", "ema.safetensors", "state.json", "state.safetensors"} <= set(os.listdir(ckpt))
    assert (tmp_path / "run" / "samples-0000004.png").exists()
    assert Image.open(tmp_path / "run" / "curve.png").size[0] > 400  # the run's loss and accuracy curves
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["final"] and np.isfinite(log[-1]["val_loss"])

    run("sample.py", "--ckpt", tmp_path / "run", "--prompt", "a red circle on the left", "--prompt",
        "a blue square at the top", "--n", "2", "--steps", "3", "--out", tmp_path / "samples", cwd=tmp_path)
    files = sorted(os.listdir(tmp_path / "samples"))
    assert files == ["000000.png", "000001.png", "000002.png", "000003.png", "prompts.txt", "sample.json"]
    assert Image.open(tmp_path / "samples" / "000000.png").size == (8, 8)
    assert Image.open(tmp_path / "samples_grid.png").size == (16, 16)  # beside the folder: not a sample


@pytest.mark.slow
def test_sample_without_checkpoint_says_what_to_do(tmp_path):
    p = run("sample.py", "--ckpt", tmp_path / "none", check=False)
    assert p.returncode != 0 and "no checkpoint at" in p.stderr and "python train.py" in p.stderr


# --- batch arithmetic, recipe stages ----------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    (dict(batch_size=10, micro_batch=4), r"batch_size=10 does not split into world size 1 x grad_accum x micro-batch"),
    (dict(batch_size=8, micro_batch=16), r"batch_size=8 does not split .* micro_batch=16"),
    (dict(batch_size=8, grad_accum=3), r"batch_size=8 does not split .* \(grad_accum=3, micro_batch=0"),
    (dict(batch_size=8, data_lanes=3), r"data_lanes=3 must be a multiple of the world size 1 and divide batch_size=8"),
])
def test_batch_arithmetic_errors(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        train.train(tiny_config(tmp_path, **kw))


@pytest.mark.slow
def test_accumulation_matches_one_big_batch(tmp_path, capsys):
    # the noise of a step is drawn for the whole global batch, so micro-batching changes only float rounding
    # (mask ratio 0: token masks are drawn per forward pass)
    logs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        train.train(tiny_config(tmp_path, micro_batch=micro, mask_ratio=0.0, max_steps=3, log_every=1,
                                out_dir=str(out)))
        logs[micro] = [r["loss"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert "batch 8 = 1 ranks x 4 accumulation x 2 micro-batch" in capsys.readouterr().out
    assert len(logs[8]) == 3 and logs[8] == pytest.approx(logs[2], abs=1e-5)


@pytest.mark.slow
def test_init_from_a_smaller_latent_recomputes_pos_embed(tmp_path):
    train.train(tiny_config(tmp_path, max_steps=2, out_dir=str(tmp_path / "a")))  # 8x8 latents: a 4x4 patch grid
    # lr 0: AdamW and the EMA leave the weights exactly as loaded
    train.train(tiny_config(tmp_path, latent_size=16, pos_interp_scale=2.0, init_from=str(tmp_path / "a"), lr=0.0,
                            max_steps=1, resume="auto", data_dir=str(tmp_path / "data16"), out_dir=str(tmp_path / "b")))
    a = load_file(tmp_path / "a" / "ckpt-0000002" / "model.safetensors")
    for name in ("model", "ema"):  # the EMA starts from the loaded weights
        b = load_file(tmp_path / "b" / "ckpt-0000001" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "pos_embed")
        # an 8x8 grid at interp scale 2 has coordinates 0, 0.5, ..., 3.5: its even points are the 4x4 grid's
        assert b["pos_embed"].shape == (1, 64, 32) and a["pos_embed"].shape == (1, 16, 32)
        assert torch.equal(b["pos_embed"].reshape(8, 8, 32)[::2, ::2].reshape(1, 16, 32), a["pos_embed"])
    assert json.load(open(tmp_path / "b" / "ckpt-0000001" / "state.json"))["step"] == 1  # weights only: from step 0


@pytest.mark.slow
def test_init_state_continues_another_run_exactly(tmp_path, capsys):
    train.train(tiny_config(tmp_path, out_dir=str(tmp_path / "a")))  # checkpoints at 3 and 6
    cfg = tiny_config(tmp_path, out_dir=str(tmp_path / "b"), resume="auto", init_state=True,
                      init_from=str(tmp_path / "a" / "ckpt-0000003"))
    train.train(cfg)
    assert f"started from {tmp_path / 'a' / 'ckpt-0000003'} at step 3" in capsys.readouterr().out
    assert sorted(d for d in os.listdir(tmp_path / "b") if d.startswith("ckpt")) == ["ckpt-0000006"]
    for name in ("model", "ema", "state"):
        x = load_file(tmp_path / "a" / "ckpt-0000006" / f"{name}.safetensors")
        y = load_file(tmp_path / "b" / "ckpt-0000006" / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    cfg.max_steps = 7  # once the run has a checkpoint of its own, it resumes that instead
    train.train(cfg)
    assert f"resumed from {tmp_path / 'b' / 'ckpt-0000006'} at step 6" in capsys.readouterr().out


# The MicroDiT paper's four-stage training recipe (arXiv 2407.15811; micro_diffusion/configs/res_256_pretrain.yaml,
# res_256_finetune, res_512_pretrain, res_512_finetune), row by row: mask ratio, last step, lr, schedule, warmup,
# clip, ema, latent size, interp scale, P_mean, P_std
RECIPE_STAGES = {
    "stage1_256_masked": (0.75, 250_000, 2.4e-4, "cosine", 2500, 0.25, 0.0, 32, 1.0, -0.6, 1.2),
    "stage2_256_unmasked": (0.0, 280_000, 8e-5, "constant", 0, 0.25, 0.0, 32, 1.0, -0.6, 1.2),
    "stage3_512_masked": (0.75, 50_000, 8e-5, "constant", 500, 0.5, 0.99975, 64, 2.0, 0.0, 0.6),
    "stage4_512_unmasked": (0.0, 55_000, 8e-5, "constant", 0, 0.5, 0.9975, 64, 2.0, 0.0, 0.6),
}


def test_recipe_configs_follow_the_papers_recipe():
    cfgs = {name: load([str(ROOT / "configs" / f"{name}.py")]) for name in RECIPE_STAGES}
    for name, cfg in cfgs.items():
        mcfg = train.model_config(cfg)
        assert (cfg.mask_ratio, cfg.max_steps, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.grad_clip, cfg.ema_decay,
                mcfg.latent_size, mcfg.pos_interp_scale, cfg.P_mean, cfg.P_std) == RECIPE_STAGES[name], name
        assert (cfg.model, cfg.batch_size, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.bf16, cfg.sigma_data,
                cfg.caption_dropout, cfg.resume) == ("MicroDiT_XL_2", 2048, 0.9, 0.999, 1e-8, 0.1, True, 0.9, 0.1,
                                                     "auto")
        assert cfg.mask_ratio == 0 or cfg.unmasked_steps == 0  # the masked stages stay masked to their end
        assert cfg.batch_size % (cfg.micro_batch * 8) == 0 and cfg.data_lanes % 8 == 0  # one 8-GPU node
    s1, s2, s3, s4 = cfgs.values()
    assert s1.min_lr_ratio == 0.33 and train.lr_at(s1.max_steps, s1) == pytest.approx(s2.lr, rel=0.02)
    # stages 2 and 4 continue the full state of the stage before; stage 3 takes stage 2's weights only
    assert (s2.init_from, s3.init_from, s4.init_from) == (s1.out_dir, s2.out_dir, s3.out_dir) and not s1.init_from
    assert (s2.init_state, s3.init_state, s4.init_state) == (True, False, True)


# --- the curve of a run: evaluations along the way, the wsd schedule --------------------------------

def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    cfg = train.TrainConfig(lr=1.0, lr_schedule="wsd", warmup_steps=10, max_steps=110, decay_steps=20,
                            min_lr_ratio=0.1)
    lr = lambda step: train.lr_at(step, cfg)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)  # the warmup, as the cosine's
    assert lr(10) == lr(50) == lr(89) == 1.0  # stable until the last 20 steps
    for step in (90, 95, 99, 109):  # then a line from lr down to lr * min_lr_ratio at the last step (109)
        assert lr(step) == pytest.approx(1.0 - 0.9 * (step + 1 - 90) / 20)
    assert lr(109) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    for argv, message in [(["--lr_schedule=wsd"], "--decay_steps=0: must be >= 1 with --lr_schedule=wsd"),
                          (["--lr_schedule=linear"], "must be 'wsd' \\(warmup-stable-decay\\), 'cosine' or 'constant'"),
                          (["--curve_n=-1"], "--curve_n=-1: must be >= 0")]:
        with pytest.raises(config.UsageError, match=message):
            train.check_config(load(argv))


@pytest.mark.slow
def test_evaluations_along_the_way_change_no_weight_and_state_their_flops(tmp_path, capsys):
    # 6 steps at mask 0.5, the last 2 unmasked; one run evaluates at steps 2 and 4 (2 captions each), one not
    kw = dict(mask_ratio=0.5, unmasked_steps=2, lr_schedule="wsd", decay_steps=2, eval_n=4, curve_n=2,
              eval_steps=2, ckpt_every=6)
    train.train(tiny_config(tmp_path, out_dir=str(tmp_path / "plain"), **kw))
    train.train(tiny_config(tmp_path, out_dir=str(tmp_path / "curve"), eval_every=2, **kw))
    for name in ("model", "ema"):  # the evaluations draw from their own RNG: the same weights, byte for byte
        plain = (tmp_path / "plain" / "ckpt-0000006" / f"{name}.safetensors").read_bytes()
        assert plain == (tmp_path / "curve" / "ckpt-0000006" / f"{name}.safetensors").read_bytes()
    out = capsys.readouterr().out
    assert out.count("2 captions sampled (2 Heun steps)") == 2 and out.count("4 captions sampled") == 2
    points = [r for r in map(json.loads, open(tmp_path / "curve" / "log.jsonl")) if "flops" in r]
    assert [(p["step"], p["samples"], p.get("final", False)) for p in points] == [
        (2, 16, False), (4, 32, False), (6, 48, True)]
    assert all(0 <= p["acc_mean"] <= 1 and np.isfinite(p["val_loss"]) and p["eval_s"] > 0 for p in points)
    # the FLOPs they claim, from model.py's counter: steps 0-3 at mask 0.5, steps 4 and 5 unmasked, 8 images each
    from model import flops_per_image
    f = lambda mask: flops_per_image(get_config("MicroDiT_test"), mask, caption_len=24) * 8
    for p, flops in zip(points, [2 * f(0.5), 4 * f(0.5), 4 * f(0.5) + 2 * f(0.0)]):
        assert p["flops"] == pytest.approx(flops, rel=0.01)
