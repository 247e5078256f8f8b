"""A user's first hour, tried as a user runs the scripts: an out_dir holds one run, --help on every script,
every config value checked before any work, config files and damaged files reported in one line that says what
and where, datasets named by what defines them, progress that says how far, and a warning on a shared CPU."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import train
from conftest import ENV, ROOT, run

pytestmark = pytest.mark.slow  # the full tier: every test runs the scripts in subprocesses, as a user does

TINY = ["--model=MicroDiT_test", "--dataset_size=64", "--batch_size=4", "--eval_n=0", "--val_n=8",
        "--peak_flops=1e12", "--threads=1"]


def snapshot(folder):
    """{relative path: (size, mtime)} of every file below a folder: what must not change."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                          os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def one_line_error(p, *parts):
    """The run failed with exactly one line on stderr that holds every part, and no traceback."""
    err = p.stderr.strip()
    assert p.returncode != 0 and "\n" not in err and "Traceback" not in err, p.stdout + p.stderr
    for part in parts:
        assert part in err, err
    return err


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "shapes8"
    run("train.py", *TINY, "--max_steps=0", f"--data_dir={path}", f"--out_dir={path.parent / 'warmup'}")
    return path


# --- 1: an out_dir holds one run -----------------------------------------------------------------------------

def test_a_new_run_never_destroys_another_runs_checkpoints(tmp_path, data_dir):
    out = tmp_path / "R2"
    run("train.py", *TINY, "--max_steps=40", "--ckpt_every=10", "--keep_ckpts=2", f"--data_dir={data_dir}",
        f"--out_dir={out}")
    before = snapshot(out)
    assert {"ckpt-0000030/model.safetensors", "ckpt-0000040/model.safetensors", "log.jsonl"} <= set(before)
    p = run("train.py", *TINY, "--max_steps=20", "--ckpt_every=10", f"--data_dir={data_dir}", f"--out_dir={out}",
            check=False)
    one_line_error(p, f"{out} holds another run (checkpoints up to ckpt-0000040)", "--resume=auto",
                   "--out_dir", "--overwrite")
    assert snapshot(out) == before  # nothing lost, nothing written
    # the offered ways out: a new run after --overwrite owns the folder and its log alone
    p = run("train.py", *TINY, "--max_steps=20", "--ckpt_every=10", "--keep_ckpts=1", "--log_every=10",
            f"--data_dir={data_dir}", f"--out_dir={out}", "--overwrite=true")
    assert "--overwrite: deleted the run in" in p.stdout
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt")) == ["ckpt-0000020"]  # pruned, not the new
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl"))]
    assert steps == [1, 10, 20, 20]  # this run's lines only: the first step, each log_every, the final record
    p = run("train.py", *TINY, "--max_steps=30", "--ckpt_every=10", f"--data_dir={data_dir}", f"--out_dir={out}",
            "--resume=auto")
    assert f"resumed from {out / 'ckpt-0000020'} at step 20" in p.stdout


# --- 2 and acceptance 3: --help on every script ----------------------------------------------------------------

def test_train_help_lists_every_field_with_its_default_and_comment():
    for flag in ("--help", "-h"):
        p = run("train.py", flag)
        assert p.returncode == 0 and not p.stderr
        for f in fields(train.TrainConfig):
            assert re.search(rf"^  --{f.name}={re.escape(str(f.default))} ", p.stdout, re.M), f.name
    # the descriptions are the dataclass's trailing comments, read from the source
    assert re.search(r"--mask_ratio=0.5 +fraction of patches dropped \(after the patch-mixer, if any\)", p.stdout)
    assert "0 = world size. A fixed value" in p.stdout  # a comment continued on the next line


@pytest.mark.parametrize("script", ["sample.py", "fid.py", "scaling.py", "experiments.py", "data.py"])
def test_every_script_help_lists_every_flag_with_its_default(script):
    p = run(script, "--help")
    assert p.returncode == 0
    flags = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", (ROOT / script).read_text()))
    assert flags, script
    for flag in flags:  # every flag the script defines, whatever its subcommand
        assert flag in p.stdout, (script, flag)
    assert p.stdout.count("(default:") >= len(flags) - 3  # store_true flags may show none


# --- 3 and acceptance 2: every field checked before any work ----------------------------------------------------

BAD = {  # field -> a wrong or out-of-range value
    "dataset": "pictures", "data_dir": "nowhere", "dataset_size": 0, "text_context": 1.5, "dataset_scenes": -1,
    "dataset_captions": "some", "shuffle_buffer": 0,
    "num_workers": -1, "data_lanes": -1, "model": "MicroDiT_s", "model_args": "depht=3", "latent_size": 7,
    "pos_interp_scale": -1, "P_mean": "nan", "P_std": 0, "sigma_data": 0, "mask_ratio": 1.0,
    "unmasked_steps": -1, "caption_dropout": 1.5, "batch_size": 0, "grad_accum": 0, "micro_batch": -1,
    "max_steps": -1, "lr": -1, "lr_schedule": "linear", "warmup_steps": -1, "min_lr_ratio": 2,
    "weight_decay": -0.1, "beta1": 1.0, "beta2": 1.5, "eps": 0, "grad_clip": -1, "ema_decay": 1.0,
    "max_bad_steps": 0, "device": "tpu", "bf16": "maybe", "compile": "maybe", "fsdp": "maybe",
    "act_ckpt": "maybe", "seed": -1, "threads": -1,
    "out_dir": " ", "overwrite": "perhaps", "log_every": 0, "eval_every": -1, "eval_n": -1, "eval_steps": 0,
    "eval_guidance": -1, "val_n": -1, "ckpt_every": 0, "keep_ckpts": 0, "push_to_hub": "not a repo id",
    "resume": "nowhere", "init_from": "./nowhere", "init_state": "true", "peak_flops": -1,
}


def test_every_field_of_the_config_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    assert set(BAD) == {f.name for f in fields(train.TrainConfig)}  # a new field needs its bad value here
    monkeypatch.chdir(tmp_path)  # the built-in dataset would be written to ./data_cache
    for key, value in BAD.items():
        extra = ["--dataset=shards"] if key == "data_dir" else []
        with pytest.raises(SystemExit) as e:
            train.main(["--model=MicroDiT_test", f"--out_dir={tmp_path / 'out'}", *extra, f"--{key}={value}"])
        message = str(e.value.code)
        assert message.startswith("train.py: error: --") and "\n" not in message, (key, message)
        assert re.search(rf"--{key}\b", message), (key, message)
        assert os.listdir(tmp_path) == [], (key, os.listdir(tmp_path))  # no data generated, no checkpoint


def test_impossible_values_are_one_line_errors_as_run(tmp_path):
    cases = [("--mask_ratio=1.0", "--mask_ratio=1.0: must be in [0, 1)"),
             ("--lr_schedule=linear", "'cosine' or 'constant'"),
             ("--max_steps=-5", "--max_steps=-5: must be >= 0"),
             ("--log_every=0", "--log_every=0: must be >= 1"),
             ("--model=MicroDiT_s", "must be a preset of model.py: MicroDiT_XL_2"),
             ("--model=UNet_test", "--mask_ratio=0.5: must be 0 for UNet_test"),
             ("--device=cuda:7" if torch.cuda.is_available() else "--device=cuda", "--device=cuda")]
    for arg, message in cases:
        one_line_error(run("train.py", "--model=MicroDiT_test", f"--out_dir={tmp_path}/out", arg, check=False,
                           cwd=tmp_path), message)
    assert os.listdir(tmp_path) == []


# --- 4: a config file with an error names itself and the line -------------------------------------------------

def test_config_file_errors_name_the_file_and_line(tmp_path):
    for name, text, message in [
            ("div.py", "max_steps = 10\nlr = 1 / 0\n", "div.py:2: ZeroDivisionError: division by zero"),
            ("syntax.py", "max_steps = 10\nlr = (1e-3\n", "syntax.py:2: '(' was never closed"),
            ("empty.py", "# nothing set\n_scratch = 3\n", "empty.py: sets no config field"),
            ("typo.py", "max_step = 10\n", "typo.py: unknown config key 'max_step'")]:
        (tmp_path / name).write_text(text)
        one_line_error(run("train.py", tmp_path / name, check=False, cwd=tmp_path), message)


# --- 5: another seed or size makes its own dataset folder ------------------------------------------------------

def test_another_seed_or_size_gets_its_own_dataset(tmp_path):
    for args in (["--seed=0"], ["--seed=1"], ["--seed=1", "--dataset_size=72"]):
        out = f"--out_dir=runs/{'_'.join(a.strip('-') for a in args)}"
        run("train.py", *TINY, "--max_steps=1", out, *args, cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "data_cache")) == [
        "shapes8_n64_seed0_d16_ctx0.7", "shapes8_n64_seed1_d16_ctx0.7", "shapes8_n72_seed1_d16_ctx0.7"]


# --- 7: damaged inputs: one line that names the file --------------------------------------------------------------

def test_a_truncated_shard_is_found_at_start(tmp_path, data_dir):
    damaged = tmp_path / "data"
    run("data.py", "shapes", "--out", damaged, "--n", "64", "--res", "8", "--text-dim", "16", "--shard-size", "16")
    shard = damaged / "shard-00003.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    p = run("train.py", *TINY, "--dataset=shards", f"--data_dir={damaged}", f"--out_dir={tmp_path / 'out'}",
            "--max_steps=40", check=False)
    one_line_error(p, f"{shard}:", "bytes but index.json says")
    assert not re.search(r"^step ", p.stdout, re.M) and not list((tmp_path / "out").glob("ckpt-*"))
    # the same size but a scribbled header: found by a DataLoader worker when the stream reaches it, said in one
    # line, and the run exits (the workers do not keep it waiting)
    shutil.rmtree(damaged)
    run("data.py", "shapes", "--out", damaged, "--n", "64", "--res", "8", "--text-dim", "16", "--shard-size", "16")
    raw = bytearray(shard.read_bytes())
    shard.write_bytes(b"\xff" * 8 + raw[8:])
    p = run("train.py", *TINY, "--dataset=shards", f"--data_dir={damaged}", f"--out_dir={tmp_path / 'out2'}",
            "--max_steps=40", "--num_workers=2", check=False, timeout=120)
    one_line_error(p, f"{shard}: unreadable shard")
    p = run("train.py", *TINY, f"--data_dir={damaged}", "--dataset=shards", "--num_workers=5",
            f"--out_dir={tmp_path / 'out3'}", check=False)
    one_line_error(p, "--num_workers=5", "has 4 shards, too few for 1 data lanes x 5 workers")


def test_a_full_disk_during_a_checkpoint_names_the_path_and_leaves_nothing_half_written(tmp_path, data_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, "--max_steps=2", f"--data_dir={data_dir}", f"--out_dir={out}")
    before = snapshot(out / "ckpt-0000002")

    def small_disk():  # a file-size limit stands in for a full disk: writes past 64 KB fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--max_steps=4", f"--data_dir={data_dir}",
                        f"--out_dir={out}", "--resume=auto"], env=ENV, capture_output=True, text=True,
                       preexec_fn=small_disk, timeout=300)
    one_line_error(p, f"{out / 'ckpt-0000004'}: could not be written", "File too large",
                   "nothing was left half-written")
    assert snapshot(out / "ckpt-0000002") == before  # the previous checkpoint survived
    assert sorted(os.listdir(out)) == ["ckpt-0000002", "curve.png", "log.jsonl"]  # no ckpt-0000004.tmp
    p = run("train.py", *TINY, "--max_steps=4", f"--data_dir={data_dir}", f"--out_dir={out}", "--resume=auto")
    assert "resumed from" in p.stdout and (out / "ckpt-0000004" / "model.safetensors").exists()


def test_damaged_checkpoint_files_are_named_in_one_line(tmp_path, data_dir):
    out = tmp_path / "out"
    run("train.py", *TINY, "--max_steps=1", f"--data_dir={data_dir}", f"--out_dir={out}")
    ckpt = out / "ckpt-0000001"
    sample = lambda ref: run("sample.py", "--ckpt", ref, "--prompt", "a red circle", "--steps", "2", "--out",
                             tmp_path / "samples", check=False)
    one_line_error(sample(ckpt / "model.safetensors"), "model.safetensors")  # a weights file, not the folder
    for name in ("model.safetensors", "ema.safetensors"):
        with open(ckpt / name, "r+b") as f:
            f.truncate(1000)
    one_line_error(sample(ckpt), f"{ckpt / 'ema.safetensors'}: not a plain tensor state dict")
    (ckpt / "config.json").write_text("{not json")
    one_line_error(sample(ckpt), f"{ckpt / 'config.json'}: not valid JSON")
    (ckpt / "config.json").write_text("[1, 2]")
    one_line_error(sample(ckpt), f"{ckpt / 'config.json'}: not a checkpoint config")
    evil = tmp_path / "evil.pt"
    torch.save({"pos_embed": torch.zeros(1), "step": object()}, evil)
    one_line_error(sample(evil), f"{evil}: not a plain tensor state dict that loads safely")


# --- 8: progress ---------------------------------------------------------------------------------------------------

def test_log_lines_say_how_far_and_the_first_comes_at_once(tmp_path, data_dir):
    p = run("train.py", *TINY, "--max_steps=6", "--log_every=1000", "--eval_n=2", "--eval_steps=2",
            f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    lines = [line for line in p.stdout.splitlines() if re.match(r"step +\d+/6 \| loss", line)]
    assert [int(re.match(r"step +(\d+)", line)[1]) for line in lines] == [1, 6]  # the first step, the last
    assert all(re.search(r"\| ETA \d+m\d\ds", line) for line in lines)
    assert "evaluating: validation loss on 8 images, 2 captions sampled" in p.stdout
    assert "sampling: 100%" in p.stderr  # the evaluation's progress bar


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, data_dir):
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "train.py"), *TINY, "--batch_size=256", "--max_steps=200",
            "--ckpt_every=1000", f"--data_dir={data_dir}", f"--out_dir={out}"]
    p = subprocess.Popen(args, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in p.stdout:  # training is under way
        if line.startswith("step      1/"):
            break
    p.send_signal(signal.SIGINT)
    for line in p.stdout:
        if "press Ctrl-C again to stop without one" in line:
            break
    p.send_signal(signal.SIGINT)
    out_text, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "stopped without a checkpoint" in err, out_text + err
    assert not list(out.glob("ckpt-*")) and "Traceback" not in err


# --- 9: a shared CPU is said, with what to do -------------------------------------------------------------------

def test_a_busy_machine_is_warned_about(tmp_path, data_dir):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        p = run("train.py", *TINY, "--max_steps=1", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'a'}",
                env={"MICRODIT_CACHE": str(tmp_path / "cache")})
    finally:
        busy.kill()
    assert re.search(r"warning: this CPU is shared \(\d+ other busy process", p.stdout), p.stdout
    assert "--threads=N" in p.stdout
    # and a machine whose matmuls run far below its own idle figure (recorded from an earlier, idle run)
    (tmp_path / "cache").mkdir(exist_ok=True)
    key = f"{torch.__version__}/torch.float32/1 threads"
    (tmp_path / "cache" / "peak_flops.json").write_text(json.dumps({key: 1e15}))
    p = run("train.py", *TINY[:-2], "--threads=1", "--max_steps=1", f"--data_dir={data_dir}",
            f"--out_dir={tmp_path / 'b'}", env={"MICRODIT_CACHE": str(tmp_path / "cache")})
    assert re.search(r"matmuls run at \d+ GFLOP/s, 1000000 when this machine was idle", p.stdout), p.stdout
