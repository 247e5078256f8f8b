"""sample.py as the sampler of a FID protocol: one job per folder, PNGs streamed to disk that resume after
SIGTERM or kill -9, the same bytes from 1 or 2 processes, the grid beside the folder, one-line errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoint import load_pretrained, save_pretrained
from conftest import BUILTIN16, ENV, PIXELS, ROOT, run, tiny_denoiser
from encoders import CLIPTokenizer, _byte_to_unicode
from shapes import BuiltinTextEncoder

N, BATCH = 96, 4  # the interrupted job: 24 batches, time to stop it part-way


def captions(n):
    """n captions of the built-in dataset's vocabulary, most of them different."""
    sizes, colors = ["small", "large"], ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    places = ["on the left", "on the right", "at the top", "at the bottom"]
    return [f"a {sizes[i % 2]} {colors[i % 6]} {shapes[i % 3]} {places[i // 6 % 4]}" for i in range(n)]


def pngs(folder):
    """{name: bytes} of the numbered PNGs in a folder."""
    return {f: (folder / f).read_bytes() for f in os.listdir(folder) if re.fullmatch(r"\d{6}\.png", f)}


def job_files(folder):
    """{name: bytes} of everything in a folder but sample.json, whose command line differs between runs."""
    return {f: (folder / f).read_bytes() for f in os.listdir(folder) if f != "sample.json"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint folder of MicroDiT_test with different raw and EMA weights."""
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(folder, tiny_denoiser(0).net, ema=tiny_denoiser(1).net,
                    extra={"text_encoder": BUILTIN16, "latents": PIXELS, "sigma_data": 0.9})
    return folder


@pytest.fixture(scope="module")
def job(ckpt, tmp_path_factory):
    """The arguments of an N-image job and its folder from one uninterrupted run."""
    root = tmp_path_factory.mktemp("job")
    (root / "captions.txt").write_text("".join(c + "\n" for c in captions(N)))
    args = ["--ckpt", ckpt, "--prompts-file", root / "captions.txt", "--steps", 8, "--seed", 5,
            "--batch-size", BATCH]
    run("sample.py", *args, "--out", root / "straight")
    assert len(pngs(root / "straight")) == N
    return args, root / "straight"


@pytest.mark.slow
def test_two_ranks_write_the_same_bytes_as_one_process(job, tmp_path):
    args, straight = job
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "sample.py"), *map(str, args), "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert job_files(tmp_path / "two") == job_files(straight)  # every PNG, prompts.txt: byte for byte
    assert len(set(pngs(straight).values())) == N  # and the images do differ from each other
    assert f"{N} written this run" in p.stdout  # rank 0 counts the images of both ranks


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_resumes_to_the_same_folder(job, tmp_path, sig):
    args, straight = job
    out, cmd = tmp_path / "out", [*args, "--out", tmp_path / "out"]
    p = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *map(str, cmd)], cwd=ROOT, env=ENV,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out.is_dir() and pngs(out)):  # wait until sampling is under way
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.01)
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=120)
    k = len(pngs(out))
    assert 1 <= k < N, err
    if sig == signal.SIGTERM:
        assert p.returncode == 143 and err.strip().splitlines()[-1].startswith(
            f"stopped by SIGTERM: {k} of {N} images on disk in {out}/"), err
        assert "the same command resumes" in err
    else:
        assert p.returncode == -signal.SIGKILL
        # what a kill -9 amid a batch's writes leaves: a hole in a batch, half a PNG under a temporary name
        hole = out / min(pngs(out))  # 000000.png: the first batch now has a hole
        (out / f"{hole.name}.tmp").write_bytes(hole.read_bytes()[:40])
        hole.unlink()
        k -= 1
    kept = {f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns) for f in pngs(out)}
    rerun = run("sample.py", *cmd)
    assert f"{N - k} written this run, {k} were on disk" in rerun.stdout
    # the images already there were not written again (an atomic write would give a new inode)
    assert {f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns) for f in kept} == kept
    assert job_files(out) == job_files(straight)  # nothing missing, nothing extra (no .tmp), the same bytes


def test_a_folder_of_another_job_is_refused_until_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "samples"
    base = ["--ckpt", str(ckpt), "--prompt", "a red circle on the left", "--n", "3", "--steps", "2",
            "--out", str(out)]
    assert sample.main(base) == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    grid = (tmp_path / "samples_grid.png").read_bytes()
    for change, differs in [(["--steps", "3"], "steps 2 vs 3"), (["--seed", "1"], "seed 0 vs 1"),
                            (["--n", "2"], "n 3 vs 2"), (["--no-ema"], "ema True vs False"),
                            (["--guidance", "2"], "guidance 5.0 vs 2.0"), (["--bf16"], "bf16 False vs True"),
                            (["--prompt", "a red circle"], "count 3 vs 6")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample.main(base + change)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"sample.py: error: {out}/ holds another job: "), err
        assert differs in err and "--overwrite" in err and "another --out" in err
        assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing deleted or written
    # the same number of images, other captions: prompts.txt names the first line that differs
    other = base[:3] + ["a blue square at the top"] + base[4:]
    with pytest.raises(SystemExit):
        sample.main(other)
    err = capsys.readouterr().err
    assert "prompts.txt line 1: ['a red circle on the left'] vs ['a blue square at the top']" in err
    # --overwrite deletes that job's images, prompts.txt, sample.json and grid, and nothing else
    (out / "notes.txt").write_text("mine")
    (out / "000005.png.tmp").write_bytes(b"half a PNG")  # what a kill -9 amid an atomic write leaves
    assert sample.main(other + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png", "notes.txt", "prompts.txt",
                                       "sample.json"]
    assert (out / "prompts.txt").read_text() == "a blue square at the top\n" * 3
    assert all((out / f).read_bytes() != before[f] for f in pngs(out))
    assert (tmp_path / "samples_grid.png").read_bytes() != grid
    # numbered PNGs without a sample.json: not known to be this job's
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "000000.png")
    with pytest.raises(SystemExit):
        sample.main(base[:-1] + [str(tmp_path / "loose")])
    assert "1 numbered PNGs but no sample.json" in capsys.readouterr().err
    assert os.listdir(tmp_path / "loose") == ["000000.png"]


def test_the_folder_holds_the_job_and_the_grid_lies_beside_it(ckpt, tmp_path, capsys, monkeypatch):
    def no_distributed(*args, **kw):
        raise AssertionError("plain python must not use torch.distributed")
    for name in ("init_process_group", "all_reduce", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(torch.distributed, name, no_distributed)
    prompts = captions(5)
    argv = ["--ckpt", str(ckpt), "--n", "2", "--steps", "2", "--batch-size", "3", "--out", f"{tmp_path}/s/"]
    assert sample.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    out = tmp_path / "s"
    assert sorted(os.listdir(tmp_path)) == ["s", "s_grid.png"]
    assert sorted(os.listdir(out)) == [f"{i:06d}.png" for i in range(10)] + ["prompts.txt", "sample.json"]
    assert f"grid beside it: {tmp_path}/s_grid.png" in capsys.readouterr().out
    assert (out / "prompts.txt").read_text().splitlines() == [p for p in prompts for _ in range(2)]
    manifest = json.loads((out / "sample.json").read_text())
    assert {k: manifest[k] for k in ("ckpt", "seed", "steps", "guidance", "n", "ema", "count")} == {
        "ckpt": str(ckpt), "seed": 0, "steps": 2, "guidance": 5.0, "n": 2, "ema": True, "count": 10}
    assert "--n 2 --steps 2" in manifest["command"]
    # the folder's images are those of generate(), in memory, from the EMA weights, in the same batches
    D, config = load_pretrained(str(ckpt))
    images = sample.generate(D, config, [p for p in prompts for _ in range(2)], steps=2, batch_size=3,
                             progress=False)
    on_disk = [np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(10)]
    assert all(np.array_equal(a, b) for a, b in zip(images, on_disk))
    grid = np.asarray(Image.open(tmp_path / "s_grid.png"))  # 10 images: 4 columns, 3 rows of 8x8
    assert grid.shape == (24, 32, 3) and np.array_equal(grid[16:24, 8:16], on_disk[9])
    # a job of more than 256 images gets no grid
    argv = ["--ckpt", str(ckpt), "--prompt", "a red circle", "--n", "257", "--steps", "1",
            "--batch-size", "257", "--out", str(tmp_path / "big")]
    assert sample.main(argv) == 0
    assert len(os.listdir(tmp_path / "big")) == 259 and not (tmp_path / "big_grid.png").exists()


@pytest.mark.slow
def test_help_lists_every_flag_with_its_default():
    text = run("sample.py", "--help").stdout
    defaults = {"--ckpt": "out/default", "--official-preset": "MicroDiT_XL_2", "--prompt": "[]",
                "--prompts-file": "None", "--n": "1", "--steps": "30", "--guidance": "5.0", "--seed": "0",
                "--batch-size": "32", "--out": "out/samples", "--overwrite": "False", "--no-ema": "False",
                "--text-encoder": "None", "--vae": "None", "--bf16": "auto",
                "--device": "auto"}
    usage = text[:text.index("\n\n")]
    assert set(re.findall(r"\[(--[a-z0-9-]+)", usage)) == set(defaults)  # no flag left out of this list
    entries = re.split(r"\n  (?=-)", text[text.index("options:"):])[1:]  # one per flag, its help wrapped
    for flag, default in defaults.items():
        entry = next(" ".join(e.split()) for e in entries if re.match(rf"{flag}\b(?!-)", e))
        assert entry.endswith(f"(default: {default})"), entry


@pytest.fixture
def broken_ckpt(ckpt, tmp_path):
    """A copy of the checkpoint whose EMA weights file was cut short."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in os.listdir(ckpt):
        (folder / f).write_bytes((ckpt / f).read_bytes()[:100 if f == "ema.safetensors" else None])
    return folder


@pytest.mark.parametrize("argv, message, code", [  # code 2: the command must change; 1: the job failed
    (["--ckpt", "{tmp}/none"], "no checkpoint at '{tmp}/none'", 2),
    (["--ckpt", "{ckpt}/model.safetensors"], "--ckpt {ckpt}/model.safetensors is a weights file: pass its "
     "checkpoint folder {ckpt}", 2),
    (["--ckpt", "{tmp}/captions.txt"], "--ckpt {tmp}/captions.txt: neither a checkpoint folder", 2),
    (["--ckpt", "{broken}"], "{broken}/ema.safetensors: not a plain tensor state dict", 1),
    (["--prompts-file", "{tmp}/captions.txt"], "--prompts-file {tmp}/captions.txt: line 3 is empty", 2),
    (["--prompts-file", "{tmp}/missing.txt"], "--prompts-file {tmp}/missing.txt: no such file", 2),
    (["--prompts-file", "{tmp}"], "--prompts-file {tmp} is a directory, not a text file of prompts", 2),
    (["--prompts-file", "{tmp}/empty.txt"], "--prompts-file {tmp}/empty.txt is empty", 2),
    (["--prompt", "a red circle", "--prompt", " "], "--prompt number 2 is empty", 2),
    (["--prompt", "a red circle", "--prompt", "?!"], "--prompt number 2 has no word the built-in text", 2),
    (["--n", "0"], "--n must be >= 1, got 0", 2),
    (["--steps", "0"], "--steps must be >= 1, got 0", 2),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2", 2),
    (["--guidance", "-1"], "--guidance must be >= 0, got -1.0", 2),
    (["--guidance", "nan"], "--guidance must be a finite number, got nan", 2),
    (["--guidance=-inf"], "--guidance must be a finite number, got -inf", 2),
    (["--vae", "./no/vae"], "--vae ./no/vae: no such folder", 2),
])
def test_errors_are_one_line_and_name_what_is_wrong(ckpt, broken_ckpt, tmp_path, capsys, argv, message, code):
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n   \na green triangle\n")
    (tmp_path / "empty.txt").write_bytes(b"\xef\xbb\xbf")  # a byte order mark, and nothing else
    fill = lambda s: s.format(tmp=tmp_path, ckpt=ckpt, broken=broken_ckpt)
    argv = [fill(a) for a in argv]
    argv = (["--ckpt", str(ckpt)] if "--ckpt" not in argv else []) + argv + ["--out", str(tmp_path / "out")]
    if "--prompt" not in argv and "--prompts-file" not in argv:
        argv += ["--prompt", "a red circle"]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and err.count("\n") == 1 and err.startswith("sample.py: error: "), err
    assert fill(message) in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_what_the_text_encoder_cannot_read_is_one_warning_line(capsys):
    builtin = BuiltinTextEncoder(16, 24)
    sample.check_prompts([("A red circle, a DOG and a café 🐶 on the left.", "--prompt number 1"),
                          (" ".join(["circle"] * 30), "--prompt number 2")], builtin)
    assert capsys.readouterr().err.splitlines() == [
        'warning: the model never saw these 3 words, outside the 23 of the shapes captions that the built-in text '
        'encoder knows: "DOG", "café", "🐶"',
        "warning: the text encoder reads 24 words of a prompt; longer ones are cut: --prompt number 2 "
        "(24 of 30 words kept)"]
    sample.check_prompts([(" ".join(f"w{i}" for i in range(500)), "x")], builtin)  # as many as fit, then more
    words, long = capsys.readouterr().err.splitlines()
    assert re.search(r'these 500 words, .* knows: "w0", "w1", .*"w\d+" and 4\d\d more$', words), words
    assert long.endswith("x (24 of 500 words kept)") and len(words) < 240
    # a CLIP tokenizer (here byte-level: a token a character): 75 tokens between the start and end tokens
    units = list(_byte_to_unicode().values())
    vocab = {t: i for i, t in enumerate(units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"])}
    clip = type("TextEncoder", (), {"tokenizer": CLIPTokenizer(vocab, []), "max_len": 77})()
    sample.check_prompts([("a dog", "line 1"), ("a photograph " * 9, "line 2")], clip)  # 11 tokens each
    assert capsys.readouterr().err == ("warning: the text encoder reads 75 tokens of a prompt; longer ones are cut: "
                                       "line 2 (75 of 99 tokens kept)\n")


def test_sample_json_is_strict_json(tmp_path):
    job = {"ckpt": "c", "seed": 0, "steps": 1, "guidance": float("nan"), "n": 1, "ema": False, "bf16": False,
           "count": 1, "command": "python sample.py"}
    with pytest.raises(ValueError, match="not JSON compliant"):  # a NaN never reaches the file
        sample.prepare_folder(str(tmp_path / "out"), job, ["a red circle"])
    assert os.listdir(tmp_path / "out") == []
    sample.prepare_folder(str(tmp_path / "out"), {**job, "guidance": 5.0}, ["a red circle"])
    json.loads((tmp_path / "out" / "sample.json").read_text(), parse_constant=lambda c: pytest.fail(c))
