"""`python data.py prepare` with a tiny random VAE and CLIP text tower: shards that train.py trains on, skipped
pairs reported, resumable runs, encoder specs, and training streamed from a Hub dataset repo (HF_HUB_OFFLINE=1)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import data
import encoders
import shapes
from conftest import ROOT, hub_cache

torch.set_num_threads(1)
CORRUPT = {7: "img_07.png", 23: "img_23.jpg"}  # random bytes; a JPEG cut after 200 bytes
# 4 levels (downsampling 8, as SDXL's VAE): 64px -> 8x8x3 latents, what model.py's MicroDiT_test takes
TINY_VAE = dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, latent_channels=3, norm_num_groups=4,
                scaling_factor=0.5, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # one thread, as this process


def write_tiny_encoders(folder):
    """A random AutoencoderKL in the diffusers layout (folder/vae) and a width-16 CLIP text tower in the open_clip
    layout with a byte-level vocabulary (folder/clip)."""
    torch.manual_seed(0)
    (folder / "vae").mkdir(parents=True)
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE}))
    save_file(encoders.AutoencoderKL(TINY_VAE).state_dict(), folder / "vae" / "diffusion_pytorch_model.safetensors")
    clip = folder / "clip"
    clip.mkdir()
    units = list(encoders._byte_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
    (clip / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    text_cfg = dict(context_length=77, vocab_size=len(tokens), width=16, heads=2, layers=2)
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True, "text_cfg": text_cfg}}))
    with torch.device("meta"):
        names = encoders.CLIPTextTransformer(len(tokens), 77, width=16, heads=2, layers=2, mlp_width=64).state_dict()
    save_file({k: 0.2 * torch.randn(v.shape) for k, v in names.items()}, clip / "open_clip_model.safetensors")
    return str(folder / "vae"), str(clip)


def write_pairs(folder, n=40):
    """n rendered shapes scenes with .txt captions: 64x64, 96x64 (white bars left and right), 128x160; the last 10
    in a subfolder; two of them corrupt."""
    for i in range(n):
        sub = folder / "more" if i >= 30 else folder
        sub.mkdir(parents=True, exist_ok=True)
        scene = shapes.train_scene(0, i)
        (sub / f"img_{i:02d}.txt").write_text(shapes.caption(scene) + "\n")
        img = shapes.render(scene, 128 if i % 3 == 2 else 64)
        if i % 3:
            canvas = Image.new("RGB", (96, 64) if i % 3 == 1 else (128, 160), "white")
            canvas.paste(img, (16, 0) if i % 3 == 1 else (0, 16))
            img = canvas
        if i == 7:
            (sub / CORRUPT[i]).write_bytes(np.random.default_rng(0).bytes(500))
        elif i == 23:
            img.save(sub / CORRUPT[i], quality=95)
            (sub / CORRUPT[i]).write_bytes((sub / CORRUPT[i]).read_bytes()[:200])
        else:
            img.save(sub / f"img_{i:02d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(vae folder, clip folder, pairs folder)."""
    tmp = tmp_path_factory.mktemp("tiny")
    return (*write_tiny_encoders(tmp / "encoders"), write_pairs(tmp / "pairs"))


def prepare_cmd(tiny, out, *extra):
    vae, clip, pairs = tiny
    return [sys.executable, "data.py", "prepare", "--input", pairs, "--out", out, "--res", "64", "32", "--vae", vae,
            "--text-encoder", clip, "--batch-size", "8", "--shard-size", "16", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """The output folder of one `data.py prepare` run over the 40 pairs, and that run."""
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    run = subprocess.run(prepare_cmd(tiny, out), cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out, run


def shard_files(out):
    return {os.path.join(r, f): open(os.path.join(out, r, f), "rb").read()
            for r in ("64", "32") for f in sorted(os.listdir(os.path.join(out, r)))}


def train_cmd(data_dir, out_dir):
    return [sys.executable, "train.py", "--dataset=shards", f"--data_dir={data_dir}", "--model=MicroDiT_test",
            "--max_steps=3", "--batch_size=8", "--warmup_steps=1", "--log_every=1", "--eval_n=0", "--threads=1",
            "--peak_flops=1e12", f"--out_dir={out_dir}"]


def assert_trained(run, out_dir):
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "log.jsonl")) if '"loss"' in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert os.path.isfile(os.path.join(out_dir, "ckpt-0000003", "model.safetensors"))

# -----------------------------------------------------------------------------
# acceptance 3: prepare 40 pairs (2 corrupt), train on the shards, a second run skips the finished shards


@pytest.mark.slow
def test_prepare_writes_shards_and_reports_failures(tiny, prepared):
    out, run = prepared
    kept = [i for i in range(40) if i not in CORRUPT]
    assert "38 of 40 pairs" in run.stdout and "skipped 2 (2 unreadable image)" in run.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert (report["pairs"], report["written"], report["skipped"]) == (40, 38, 2)
    assert sorted(s["path"] for s in report["skipped_pairs"]) == [CORRUPT[7], CORRUPT[23]]
    assert all(s["reason"] == "unreadable image" and s["detail"] for s in report["skipped_pairs"])
    for res, side in ((64, 8), (32, 4)):
        index = data.read_index(os.path.join(out, str(res)))
        assert index["latent_shape"] == [3, side, side] and index["text_shape"] == [77, 16]
        assert [s["count"] for s in index["shards"]] == [15, 15, 8]  # pairs 0-15, 16-31, 32-39 less 7 and 23
        everything = data.load_all(os.path.join(out, str(res)))
        assert everything["caption"] == [shapes.caption(shapes.train_scene(0, i)) for i in kept]
        meta = index["meta"]
        assert meta["text_encoder"] == {"type": "clip", "repo": tiny[1], "subfolder": None, "dim": 16, "max_len": 77}
        assert meta["latents"] == {"type": "vae", "repo": tiny[0], "subfolder": "vae", "scaling_factor": 0.5,
                                   "latent_channels": 3}
        assert (meta["res"], meta["posterior"], meta["text_dim"], meta["max_len"]) == (res, "sample", 16, 77)


@pytest.mark.slow
def test_second_run_skips_finished_shards(tiny, prepared):
    out, _ = prepared
    mtimes = lambda: {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in shard_files(out) if "shard-" in p}
    before, files = mtimes(), shard_files(out)
    run = subprocess.run(prepare_cmd(tiny, out), cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "3 of 3 shards were already done; 0 pairs encoded" in run.stdout
    assert mtimes() == before  # the shards are not written again
    assert shard_files(out) == files  # and index.json is written again with the same content
    assert json.load(open(os.path.join(out, "report.json")))["skipped"] == 2  # failures of skipped shards kept
    with pytest.raises(ValueError, match="other inputs or settings.*'seed': \\(0, 1\\)"):
        data.prepare(tiny[2], out, (64, 32), tiny[0], "vae", tiny[1], shard_size=16, seed=1)


@pytest.mark.slow
def test_train_on_prepared_shards(prepared, tmp_path):
    run = subprocess.run(train_cmd(os.path.join(prepared[0], "64"), tmp_path / "run"), cwd=ROOT, env=OFFLINE,
                         capture_output=True, text=True, timeout=300)
    assert_trained(run, tmp_path / "run")


def test_interrupted_run_then_rerun_equals_one_run(tiny, prepared, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    save, calls = data._save_shard, []

    def crash_on_fourth(*args):  # shard 0 at 64 and 32px, shard 1 at 64px, then a crash before shard 1 at 32px
        calls.append(args[0])
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return save(*args)
    monkeypatch.setattr(data, "_save_shard", crash_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        data.prepare(tiny[2], out, (64, 32), tiny[0], "vae", tiny[1], batch_size=8, shard_size=16)
    assert list(json.load(open(os.path.join(out, "prepare.json")))["shards"]) == ["0"]
    assert not os.path.exists(os.path.join(out, "64", "index.json"))
    monkeypatch.setattr(data, "_save_shard", save)
    report = data.prepare(tiny[2], out, (64, 32), tiny[0], "vae", tiny[1], batch_size=8, shard_size=16)
    assert report["shards_already_done"] == 1 and report["written"] == 38
    assert shard_files(out) == shard_files(prepared[0])  # bytes of shards and index.json, at both resolutions


def test_latents_are_vae_encodings_of_the_cropped_images(tiny, prepared, tmp_path):
    vae, clip, pairs = tiny
    # posterior means: for 64x64 images and 96x64 ones (cropped to their middle 64 columns) the VAE's own encoding
    data.prepare(pairs, str(tmp_path / "mean"), (64,), vae, "vae", clip, batch_size=5, shard_size=16, sample=False)
    mean = data.load_all(str(tmp_path / "mean" / "64"))
    model = encoders.load_vae(vae)
    kept = [i for i in range(40) if i not in CORRUPT]
    for i in (0, 3, 30, 1, 4, 31):
        img = np.asarray(Image.open(os.path.join(pairs, "more" if i >= 30 else "", f"img_{i:02d}.png")).convert("RGB"))
        x = shapes.image_to_latent(img[:, 16:80] if i % 3 == 1 else img)[None]
        with torch.no_grad():  # batch 5 there, 1 here: equal up to the fp16 rounding
            z = model.encode(x, sample=False)[0].half().float()
        assert torch.allclose(mean["latent"][kept.index(i)], z, rtol=2e-3, atol=2e-3)
    # 128x160: the short side resized to 64 (bicubic), then the middle 80 -> 64 rows
    img = Image.open(os.path.join(pairs, "img_02.png")).convert("RGB").resize((64, 80), Image.BICUBIC)
    with torch.no_grad():
        z = model.encode(shapes.image_to_latent(np.asarray(img)[8:72])[None], sample=False)[0].half().float()
    assert torch.allclose(mean["latent"][2], z, rtol=2e-3, atol=2e-3)
    # posterior samples: noisy around the mean, the same whatever the batch size (batch 8 in `prepared`)
    sampled = data.load_all(os.path.join(prepared[0], "64"))
    assert (sampled["latent"] - mean["latent"]).abs().mean() > 0.05
    assert torch.allclose(sampled["text"], mean["text"], rtol=2e-3, atol=2e-3)
    # the features are the text tower's, and the specs in the index rebuild both encoders
    meta = data.read_index(os.path.join(prepared[0], "64"))["meta"]
    enc = encoders.text_encoder_from_spec(meta["text_encoder"])
    with torch.no_grad():
        assert torch.allclose(sampled["text"], enc(sampled["caption"]).half().float(), rtol=2e-3, atol=2e-3)
    decoded = encoders.latents_to_images(sampled["latent"][:3], meta["latents"])
    with torch.no_grad():
        ref = ((model.decode(sampled["latent"][:3]).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert len(decoded) == 3 and all(d.shape == (64, 64, 3) and d.dtype == np.uint8 for d in decoded)
    assert np.array_equal(np.stack(decoded), ref.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="differs from its spec.*scaling_factor"):
        encoders.vae_from_spec(dict(meta["latents"], scaling_factor=0.13025))
    assert encoders.vae_from_spec({"type": "pixels"}) is None


def test_list_inputs_and_skipped_captions(tiny, prepared, tmp_path):
    vae, clip, pairs = tiny
    rows = [(os.path.relpath(os.path.join(pairs, "more" if i >= 30 else "", f"img_{i:02d}.png"), tmp_path),
             shapes.caption(shapes.train_scene(0, i))) for i in range(40)]
    rows = [(os.path.join(os.path.dirname(p), CORRUPT[i]) if i in CORRUPT else p, c) for i, (p, c) in enumerate(rows)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in rows))
    # the same pairs in the same order: the same shards, byte for byte
    data.prepare(str(tmp_path / "pairs.jsonl"), str(tmp_path / "jsonl"), (64, 32), vae, "vae", clip, batch_size=8,
                 shard_size=16)
    for r in ("64", "32"):
        for k in range(3):
            f = f"shard-{k:05d}.safetensors"
            assert open(tmp_path / "jsonl" / r / f, "rb").read() == open(os.path.join(prepared[0], r, f), "rb").read()
    # and with another batch size the same posterior samples: each image's noise is its own (equal up to rounding)
    data.prepare(str(tmp_path / "pairs.csv"), str(tmp_path / "csv"), (64,), vae, "vae", clip, batch_size=5,
                 shard_size=16)
    ours, ref = data.load_all(str(tmp_path / "csv" / "64")), data.load_all(os.path.join(prepared[0], "64"))
    assert ours["caption"] == ref["caption"] and torch.allclose(ours["latent"], ref["latent"], rtol=2e-3, atol=2e-3)
    # empty captions, missing caption files and missing images are skipped and reported, never silently
    (tmp_path / "bad").mkdir()
    for i, caption in enumerate(["a red circle", "   \n", None]):
        shutil.copy(os.path.join(pairs, "img_00.png"), tmp_path / "bad" / f"{i}.png")
        if caption is not None:
            (tmp_path / "bad" / f"{i}.txt").write_text(caption)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "bad/0.png", "caption": "a cat"}) + "\n"
                                        + json.dumps({"path": "bad/nope.png", "caption": "a dog"}) + "\n"
                                        + json.dumps({"path": "bad/1.png", "caption": ""}) + "\n")
    for src, reasons in (("bad", {"empty caption": 1, "no caption file": 1}),
                         ("bad.jsonl", {"unreadable image": 1, "empty caption": 1})):
        report = data.prepare(str(tmp_path / src), str(tmp_path / (src + "_out")), (32,), vae, "vae", clip)
        assert report["written"] == 1 and report["reasons"] == reasons
    (tmp_path / "broken.jsonl").write_text('{"path": "bad/0.png", "caption": "ok"}\n{"path": "bad/1.png"}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: expected string fields 'path' and 'caption'"):
        data.prepare(str(tmp_path / "broken.jsonl"), str(tmp_path / "broken"), (32,), vae, "vae", clip)
    with pytest.raises(ValueError, match="multiples of the VAE's downsampling factor 8"):
        data.prepare(str(tmp_path / "bad"), str(tmp_path / "odd"), (36,), vae, "vae", clip)

# -----------------------------------------------------------------------------
# acceptance 4: train from the shards served as a Hub dataset repo (a local HF cache, HF_HUB_OFFLINE=1)


@pytest.mark.slow
def test_train_streams_from_hub_dataset(prepared, tmp_path):
    hub_cache(tmp_path / "hub", "test/tiny-latents", prepared[0], repo_type="dataset")
    env = dict(OFFLINE, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"))
    run = subprocess.run(train_cmd("hf://datasets/test/tiny-latents/64", tmp_path / "run"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert_trained(run, tmp_path / "run")
    run = subprocess.run(train_cmd("hf://datasets/test/not-there/64", tmp_path / "run2"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "hf://datasets/test/not-there/64/index.json: no such file" in run.stderr
    assert "HF_HUB_OFFLINE" in run.stderr
