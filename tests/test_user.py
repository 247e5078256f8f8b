"""A user's first hour, tried as a user runs the scripts: an out_dir holds one run, --help on every script,
every config value checked before any work, config files and damaged files reported in one line that says what
and where, datasets named by what defines them, progress that says how far, and a warning on a shared CPU."""
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

import checkpoint
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
    "decay_steps": -1, "curve_n": -1,
}


def test_every_field_of_the_config_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    assert set(BAD) == {f.name for f in fields(train.TrainConfig)}  # a new field needs its bad value here
    monkeypatch.chdir(tmp_path)  # the built-in dataset would be written to ./data_cache
    for key, value in BAD.items():
        extra = ["--dataset=shards"] if key == "data_dir" else []
        with pytest.raises(SystemExit) as e:
            train.main(["--model=MicroDiT_test", f"--out_dir={tmp_path / 'out'}", *extra, f"--{key}={value}"])
        message = capsys.readouterr().err.strip()
        assert e.value.code == 2, (key, message)  # a usage error
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
    assert not list(out.glob("ckpt-*")) and "Traceback" not in err and LOCK not in os.listdir(out)


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


# --- issue 26: a live run's out_dir is locked; checkpoints set aside again; config files, messages, exit codes ----

RACE = [*TINY, "--max_steps=8", "--ckpt_every=4", "--log_every=1", "--warmup_steps=2", "--unmasked_steps=2",
        "--out_dir=run"]  # relative: the runs compared hold the same config, each in a folder of its own
TIMING = {"ms_per_step", "img_per_s", "data_s", "train_s", "eval_s", "wall_s"}
LOCK = "job.lock"  # lock.FILE: the lock file in a folder a job holds


def train_process(*args, cwd=ROOT):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(p, start):
    """Read p's stdout up to a line that starts with `start`."""
    for line in p.stdout:
        if line.startswith(start):
            return
    raise AssertionError(f"no line starting {start!r}: {p.communicate()}")


def run_record(out):
    """What a run leaves: every file of its checkpoints, byte for byte, and its log.jsonl without timings."""
    files = {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
             for d, _, names in os.walk(out) for f in names if os.path.relpath(d, out).startswith("ckpt-")}
    log = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "log.jsonl")]
    return files, log


def test_a_live_runs_out_dir_is_refused_to_a_second_job_and_nothing_is_lost(tmp_path, data_dir):
    (tmp_path / "alone").mkdir()
    (tmp_path / "race").mkdir()
    alone = train_process(*RACE, f"--data_dir={data_dir}", cwd=tmp_path / "alone")  # the same run, no intruder
    live = train_process(*RACE, f"--data_dir={data_dir}", cwd=tmp_path / "race")
    out = tmp_path / "race" / "run"

    def intrude(*extra):  # while the live run is paused (SIGSTOP): alive, and as slow as it can be
        before = snapshot(out)
        p = run("train.py", *RACE, f"--data_dir={data_dir}", *extra, cwd=tmp_path / "race", check=False)
        assert p.returncode == 1, p.stdout + p.stderr
        one_line_error(p, f"train.py: error: run is in use by a live job (train.py, pid {live.pid} on host ",
                       "wait for it to end or stop it")
        assert snapshot(out) == before  # nothing deleted, nothing written

    read_until(live, "config:")  # started, nothing written in out_dir yet: the moment two runs used to race
    live.send_signal(signal.SIGSTOP)
    intrude()
    live.send_signal(signal.SIGCONT)
    read_until(live, "step      5/8")  # ckpt-0000004 and five log lines written
    live.send_signal(signal.SIGSTOP)
    intrude("--overwrite")  # it would delete the live run's files
    intrude("--resume=auto")  # it would train beside it, in the same files
    live.send_signal(signal.SIGCONT)
    for p in (live, alone):
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, out_text + err
    assert run_record(out) == run_record(tmp_path / "alone" / "run")
    assert LOCK not in os.listdir(out)  # released at the end


def test_a_live_sampling_jobs_folder_is_refused_to_a_second_job_and_nothing_is_lost(tmp_path, trained):
    job = ["--ckpt", trained, "--prompt", "a red circle on the left", "--n", "6", "--batch-size", "1",
           "--steps", "4"]
    run("sample.py", *job, "--out", tmp_path / "alone")  # the same job, no intruder
    out = tmp_path / "race"
    live = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *map(str, job), "--out", str(out)],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (out / "sample.json").exists() and live.poll() is None:  # the folder is claimed
        time.sleep(0.05)
    live.send_signal(signal.SIGSTOP)  # alive, and as slow as it can be
    try:
        before = sorted(os.listdir(out))
        for extra in ([], ["--overwrite"]):
            p = run("sample.py", *job, "--out", out, *extra, check=False)
            assert p.returncode == 1, p.stdout + p.stderr
            one_line_error(p, f"sample.py: error: {out} is in use by a live job (sample.py, pid {live.pid} on host ",
                           "wait for it to end or stop it")
            assert sorted(os.listdir(out)) == before  # nothing deleted, nothing written
    finally:
        live.send_signal(signal.SIGCONT)
    _, err = live.communicate(timeout=300)
    assert live.returncode == 0, err
    pngs = [f"{i:06d}.png" for i in range(6)]
    assert [(out / f).read_bytes() for f in pngs] == [(tmp_path / "alone" / f).read_bytes() for f in pngs]
    assert LOCK not in os.listdir(out)  # released at the end


def test_a_killed_runs_lock_is_taken_over_with_a_line_saying_so(tmp_path, data_dir):
    out = tmp_path / "out"
    killed = train_process(*TINY, "--max_steps=1000", f"--data_dir={data_dir}", f"--out_dir={out}")
    read_until(killed, "step      1/")
    killed.kill()  # kill -9: no way to release the lock
    killed.communicate()
    assert LOCK in os.listdir(out)
    p = run("train.py", *TINY, "--max_steps=2", f"--data_dir={data_dir}", f"--out_dir={out}", "--resume=auto")
    assert (f"{out}: took over the lock of a job that is gone (train.py, pid {killed.pid} on host "
            f"{socket.gethostname()}, since ") in p.stdout and "; its process has exited)" in p.stdout, p.stdout
    assert "done: 2 steps" in p.stdout and LOCK not in os.listdir(out)


def test_a_checkpoint_damaged_again_at_the_same_step_falls_back_to_the_older_one(tmp_path, data_dir):
    out = tmp_path / "out"
    args = [*TINY, "--max_steps=6", "--ckpt_every=3", f"--data_dir={data_dir}", f"--out_dir={out}"]
    run("train.py", *args)  # checkpoints at steps 3 and 6
    for aside in ("ckpt-0000006.bad", "ckpt-0000006.bad-2"):  # damaged, redone by the fallback, damaged again
        with open(out / "ckpt-0000006" / "model.safetensors", "r+b") as f:
            f.truncate(1000)
        p = run("train.py", *args, "--resume=auto")
        assert f"does not load (ValueError: {out / 'ckpt-0000006' / 'model.safetensors'}" in p.stdout, p.stdout
        assert f"moved aside as {out / aside}, trying an older one" in p.stdout
        assert f"resumed from {out / 'ckpt-0000003'} at step 3" in p.stdout
    assert sorted(os.listdir(out)) == ["ckpt-0000003", "ckpt-0000006", "ckpt-0000006.bad", "ckpt-0000006.bad-2",
                                       "curve.png", "log.jsonl"]
    checkpoint.claim_out_dir(str(out), overwrite=True, resume="")  # --overwrite deletes them too
    assert os.listdir(out) == []


def test_a_json_config_is_read_and_other_files_are_refused(tmp_path, data_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": "MicroDiT_test", "dataset_size": 64, "batch_size": 4, "eval_n": 0,
                               "val_n": 8, "peak_flops": 1e12, "threads": 1, "max_steps": 1, "compile": False,
                               "data_dir": str(data_dir), "out_dir": str(tmp_path / "out")}, indent=1))
    p = run("train.py", cfg, "--seed=0")
    config = json.loads(re.search(r"^config: (.*)$", p.stdout, re.M)[1])
    assert (config["model"], config["max_steps"], config["compile"]) == ("MicroDiT_test", 1, False)
    (tmp_path / "cfg.yaml").write_text("max_steps: 1\n")
    p = run("train.py", tmp_path / "cfg.yaml", check=False)
    one_line_error(p, f"train.py: error: {tmp_path / 'cfg.yaml'}: not a config file: config files are Python "
                      f"(`key = value` lines, .py) or JSON (.json)")
    assert p.returncode == 2


def test_ctrl_c_while_the_dataset_is_written_says_so(tmp_path):
    data = tmp_path / "data"  # big enough to take seconds, even at 8 pixels
    p = train_process(*TINY, "--dataset_size=200000", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}")
    deadline = time.time() + 120
    while not (data / "val" / "index.json").exists() and time.time() < deadline:  # the held-out split is first
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)  # while the training split is being written
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and err.splitlines()[-1] == (
        f"train.py: stopped while writing the built-in dataset in {data}, before any training; the next run "
        f"writes it again"), out + err
    # not a dataset until its index.json, written last: the next run writes it again, from the start
    assert not (data / "index.json").exists() and not list(data.glob("*.tmp")) and "Traceback" not in err
    assert LOCK not in os.listdir(data) and LOCK not in os.listdir(tmp_path / "out")  # both locks released


def test_a_run_shorter_than_its_warmup_or_unmasked_end_is_warned(tmp_path, data_dir):
    p = run("train.py", *TINY, "--max_steps=6", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    assert ("warning: a short run: max_steps=6 but warmup_steps=290 (the learning rate never leaves its warmup: "
            "it ends at 2% of --lr) and unmasked_steps=400 (no step is masked); lower them for a run this short"
            ) in p.stdout.splitlines()


def test_exit_status_is_2_for_a_command_to_change_and_1_for_a_failed_job(tmp_path, data_dir):
    (tmp_path / "broken.py").write_text("max_steps = (\n")
    (tmp_path / "empty_ckpt").mkdir()
    for args, status, message in [
            (["--lr=-1"], 2, "--lr=-1.0: must be a finite number >= 0"),
            (["--max_stepz=3"], 2, "unknown config key --max_stepz"),
            ([tmp_path / "nope.py"], 2, f"config file not found: {tmp_path / 'nope.py'}"),
            ([tmp_path / "broken.py"], 2, "broken.py:1: '(' was never closed"),
            ([f"--resume={tmp_path / 'empty_ckpt'}"], 1, "model.safetensors: no such file")]:  # a damaged checkpoint
        p = run("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *args, check=False)
        one_line_error(p, message)
        assert p.returncode == status, (args, p.returncode, p.stderr)


# --- issue 26: what the sampler cannot read is said before any work; messages that point the right way; exit
# codes (sample.py, data.py, fid.py and the tools) ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One tiny trained checkpoint (MicroDiT_test, two steps, the built-in text encoder): a run's out_dir."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run("train.py", *TINY, "--max_steps=2", f"--data_dir={data_dir}", f"--out_dir={out}")
    return out


def sample_cli(ckpt, out, *args, env=None, timeout=120):
    """`python sample.py` of one 1-step image a prompt, as a user runs it; not checked."""
    return run("sample.py", "--ckpt", ckpt, "--steps", "1", "--out", out, *args, env=env, timeout=timeout,
               check=False)


def warnings_of(p):
    return [line for line in p.stderr.splitlines() if line.startswith("warning: ")]


def strict_json(path):
    """A JSON file read as strict JSON: a NaN or an Infinity in it fails the test."""
    return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}: not JSON"))


def tiny_clip_checkpoint(trained, tmp_path):
    """A copy of the trained checkpoint whose text encoder is a tiny CLIP text tower (byte-level tokens, 77 a
    caption) in a local folder: (checkpoint folder, the VAE and CLIP folders)."""
    from test_prepare import write_tiny_encoders
    vae, clip = write_tiny_encoders(tmp_path / "encoders")
    ckpt = tmp_path / "clip_ckpt"
    shutil.copytree(checkpoint.list_checkpoints(str(trained))[0], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["text_encoder"] = {"type": "clip", "repo": clip, "subfolder": None, "dim": 16, "max_len": 77}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, vae, clip


def test_words_the_model_never_saw_are_one_warning_line(trained, tmp_path):
    p = sample_cli(trained, tmp_path / "a", "--prompt", "a photograph of a dog on the beach 🐶")
    assert p.returncode == 0, p.stderr
    [line] = warnings_of(p)
    assert all(f'"{w}"' in line for w in ("photograph", "of", "dog", "beach", "🐶")), line
    assert '"a"' not in line and '"on"' not in line and "the model never saw these 5 words" in line
    p = sample_cli(trained, tmp_path / "b", "--prompt", " ".join(f"thing{i}" for i in range(60)))
    [line] = [w for w in warnings_of(p) if "never saw" in w]
    assert re.search(r'"thing0", "thing1", .* and \d+ more$', line) and len(line) < 250, line


def test_a_prompt_longer_than_the_text_encoder_reads_says_how_much_is_kept(trained, tmp_path):
    (tmp_path / "long.txt").write_text("a red circle on the left " * 973 + "\n")  # 5,838 words
    p = sample_cli(trained, tmp_path / "a", "--prompts-file", tmp_path / "long.txt")
    assert p.returncode == 0 and warnings_of(p) == [
        f"warning: the text encoder reads 24 words of a prompt; longer ones are cut: --prompts-file "
        f"{tmp_path / 'long.txt'}: line 1 (24 of 5,838 words kept)"], p.stderr
    # a CLIP tokenizer: 75 tokens between its start and end tokens (here a token a character)
    ckpt, _, _ = tiny_clip_checkpoint(trained, tmp_path)
    p = sample_cli(ckpt, tmp_path / "b", "--prompt", "a red circle", "--prompt", "a red circle on the left " * 5)
    assert p.returncode == 0 and warnings_of(p) == [
        "warning: the text encoder reads 75 tokens of a prompt; longer ones are cut: --prompt number 2 "
        "(75 of 95 tokens kept)"], p.stderr


def test_non_finite_guidance_is_refused(trained, tmp_path):
    for value in ("nan", "inf"):
        p = sample_cli(trained, tmp_path / "out", f"--guidance={value}", "--prompt", "a red circle")
        one_line_error(p, "--guidance must be a finite number, got")
        assert p.returncode == 2 and not (tmp_path / "out").exists()


def test_sample_json_is_always_strict_json(trained, tmp_path):
    for i, value in enumerate(("nan", "2")):  # refused, sampled
        sample_cli(trained, tmp_path / str(i), f"--guidance={value}", "--prompt", "a red circle")
        if (tmp_path / str(i) / "sample.json").exists():
            strict_json(tmp_path / str(i) / "sample.json")
    assert strict_json(tmp_path / "1" / "sample.json")["guidance"] == 2.0


def test_an_empty_prompts_file_is_refused(trained, tmp_path):
    for content in (b"", b"\xef\xbb\xbf"):  # nothing, or only a byte order mark
        (tmp_path / "empty.txt").write_bytes(content)
        p = sample_cli(trained, tmp_path / "out", "--prompts-file", tmp_path / "empty.txt")
        one_line_error(p, f"--prompts-file {tmp_path / 'empty.txt'} is empty")
        assert p.returncode == 2 and not (tmp_path / "out").exists()  # not the held-out captions instead


def test_a_folder_given_as_prompts_file_is_named_a_folder(trained, tmp_path):
    p = sample_cli(trained, tmp_path / "out", "--prompts-file", tmp_path)
    one_line_error(p, f"--prompts-file {tmp_path} is a directory, not a text file of prompts")
    assert p.returncode == 2


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(trained, tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle on the left\na blue square\n".encode())  # Notepad's
    p = sample_cli(trained, tmp_path / "out", "--prompts-file", tmp_path / "bom.txt")
    assert p.returncode == 0 and not warnings_of(p), p.stderr
    assert (tmp_path / "out" / "prompts.txt").read_bytes() == b"a red circle on the left\na blue square\n"


def test_a_refused_prompt_leaves_no_claimed_folder(trained, tmp_path):
    out = tmp_path / "out"
    p = sample_cli(trained, out, "--prompt", "a red circle", "--prompt", "🐶🐶")
    one_line_error(p, "--prompt number 2 has no word the built-in text encoder reads", "'🐶🐶'")
    assert p.returncode == 2 and not out.exists()
    p = sample_cli(trained, out, "--prompt", "a red circle", "--prompt", "a blue square")  # the corrected rerun
    assert p.returncode == 0 and "2 written this run" in p.stdout, p.stderr
    assert strict_json(out / "sample.json")["count"] == 2


def test_the_hub_out_of_reach_is_one_line_within_seconds(trained, tmp_path):
    """A closed port for the Hub and an empty cache: huggingface_hub alone retried for 50 s, then said that the
    repo lacked its config.json."""
    from PIL import Image
    ckpt, vae, clip = tiny_clip_checkpoint(trained, tmp_path)
    (tmp_path / "pairs").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "pairs" / "a.png")
    (tmp_path / "pairs" / "a.txt").write_text("a red square")
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (100 * i, 0, 0)).save(tmp_path / "images" / f"{i:03d}.png")
    (tmp_path / "captions.txt").write_text("a\nb\n")
    config = json.loads((ckpt / "config.json").read_text())
    config["text_encoder"]["repo"] = "someone/clip-text"  # a checkpoint whose text encoder is on the Hub
    (ckpt / "config.json").write_text(json.dumps(config))
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    prepare = ["prepare", "--input", tmp_path / "pairs", "--out", tmp_path / "prepared", "--res", "64"]
    cases = [  # (env, script and arguments, the repo, the way to a local copy)
        (offline, ["data.py", *prepare], "stabilityai/stable-diffusion-xl-base-1.0", "--vae PATH"),
        (offline, ["data.py", *prepare, "--vae", vae], "apple/DFN5B-CLIP-ViT-H-14-378", "--text-encoder PATH"),
        ({**offline, "HF_HUB_OFFLINE": "1"}, ["data.py", *prepare], "HF_HUB_OFFLINE is set", "--vae PATH"),
        (offline, ["sample.py", "--ckpt", "someone/microdit", "--out", tmp_path / "s"], "someone/microdit",
         "--ckpt PATH"),
        (offline, ["sample.py", "--ckpt", ckpt, "--out", tmp_path / "s"], "someone/clip-text",
         "--text-encoder PATH"),
        (offline, ["fid.py", "clip-score", tmp_path / "images", "--captions", tmp_path / "captions.txt"],
         "openai/clip-vit-large-patch14", "--weights DIR")]
    for env, (script, *args), repo, local in cases:
        # about 3 s on an idle machine, mostly Python's start; the bound leaves room for a busy one, and is
        # below the 46 s that huggingface_hub's retries alone slept (23 s for each of two file names)
        start = time.time()
        p = run(script, *args, env=env, check=False, timeout=45)
        one_line_error(p, "the Hugging Face Hub cannot be reached", repo, f"pass {local}, a local copy of it",
                       "HF_HUB_OFFLINE=1")
        assert p.returncode == 1 and time.time() - start < 40, (script, p.returncode, time.time() - start)
    assert not (tmp_path / "s").exists()
    # fid.py's Inception weights come from a release URL, downloaded once into MICRODIT_CACHE
    url = "http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth"
    p = run("fid.py", tmp_path / "images", "--save-stats", tmp_path / "i.npz", "--weights", url, check=False,
            env={"MICRODIT_CACHE": str(tmp_path / "cache")}, timeout=30)
    one_line_error(p, f"cannot download {url}", "Connection refused", "pass --weights PATH")
    assert p.returncode == 1


def test_prepare_counts_what_it_wrote_and_names_what_it_skipped(trained, tmp_path):
    from PIL import Image
    _, vae, clip = tiny_clip_checkpoint(trained, tmp_path)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64), "red").save(pairs / f"{name}.png")
        (pairs / f"{name}.txt").write_text(f"picture {name}")
    (pairs / "b.png").write_bytes(b"not a PNG")
    p = run("data.py", "prepare", "--input", pairs, "--out", tmp_path / "out", "--res", "64", "--vae", vae,
            "--text-encoder", clip, "--device", "cpu", "--workers", "1")
    assert "2 of 3 pairs" in p.stdout and "; 2 pairs encoded" in p.stdout, p.stdout
    assert "prepare: skipped b.png (unreadable image); all 1, with their errors, in" in p.stdout, p.stdout
    report = strict_json(tmp_path / "out" / "report.json")
    assert (report["written"], report["skipped"]) == (2, 1)


def test_fids_small_sample_warning_is_one_line(tmp_path):
    from PIL import Image
    import fid
    weights = tmp_path / "random_inception.pth"
    torch.save(fid.InceptionV3().state_dict(), weights)
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (100 * i, 50, 0)).save(tmp_path / "a" / f"{i}.png")
    p = run("fid.py", tmp_path / "a", "--save-stats", tmp_path / "a.npz", "--weights", weights, "--workers", "0",
            "--device", "cpu", env={"OPENBLAS_NUM_THREADS": "1"})
    err = [line for line in p.stderr.splitlines() if line.strip() and "FID features" not in line]  # no bar
    assert err == [f"warning: {tmp_path / 'a'}: only 2 images; with fewer than 2048 the feature covariance is "
                   "singular and FID is biased high (the COCO protocol uses 30K)"], p.stderr


def test_exit_codes_of_sample_data_fid_and_the_tools(trained, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.list_checkpoints(str(trained))[0], damaged)
    for name in ("model.safetensors", "ema.safetensors"):
        if (damaged / name).exists():
            with open(damaged / name, "r+b") as f:
                f.truncate(1000)
    (tmp_path / "pairs.jsonl").write_text('{"path": "a.png", "caption": "a"}\nnot JSON\n')
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    (tmp_path / "rows.jsonl").write_text('{"model": "x"}\nnot JSON\n')
    cases = [  # (exit code, script and arguments, part of the error): 2 the command must change, 1 the job failed
        (1, ["sample.py", "--ckpt", damaged, "--prompt", "a red circle", "--out", tmp_path / "s"],
         "not a plain tensor state dict"),
        (2, ["data.py", "prepare", "--input", tmp_path / "nowhere", "--out", tmp_path / "p"],
         "no such folder or file"),
        (1, ["data.py", "prepare", "--input", tmp_path / "pairs.jsonl", "--out", tmp_path / "p"],
         "pairs.jsonl:2: not JSON"),
        (2, ["fid.py", "coco-captions", tmp_path / "nowhere.json", "--out", tmp_path / "c.txt"], "nowhere.json"),
        (1, ["fid.py", tmp_path / "broken.npz", tmp_path / "broken.npz"], "not a readable .npz file"),
        (2, ["scaling.py", "fit", tmp_path / "nowhere.jsonl"], "nowhere.jsonl"),
        (1, ["scaling.py", "fit", tmp_path / "rows.jsonl"], "rows.jsonl:2: not JSON"),
        (2, ["experiments.py", "tune", "--report", "--out", tmp_path / "nowhere.jsonl"], "nowhere.jsonl"),
        (2, ["bench.py", "nothing"], "unknown benchmark(s) or flag(s) ['nothing']")]  # sample.py's 2: test_sample.py
    # all at once: each is mostly the start of Python and torch
    runs = [subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _, (script, *args), _ in cases]
    for (code, args, part), p in zip(cases, runs):
        err = p.communicate(timeout=120)[1].strip()
        assert p.returncode == code and part in err.splitlines()[-1], (args, p.returncode, err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "p").exists()
