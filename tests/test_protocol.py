"""The zero-shot COCO protocol end to end at tiny scale, as the README runs it: captions from a COCO-style
annotation file -> images sampled on 2 ranks -> reference statistics -> FID and CLIP score -> one JSON."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from conftest import ENV, ROOT, run
from test_clip import inception, low_rank_fid, reference_score, tiny_hf_clip  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # the full tier: the whole COCO protocol in a subprocess


@pytest.mark.filterwarnings("ignore:.*2048")
def test_captions_to_images_to_fid_and_clip_score_in_one_json(tmp_path, inception):  # noqa: F811
    net, weights = inception
    # 1. captions: a COCO captions file of 20 annotations, 6 of them drawn
    words = [(c, s) for c in ("red", "blue", "green", "small", "large") for s in ("cup", "cat", "car", "dog")]
    anns = [{"id": i, "image_id": i, "caption": f"a {c} {s} on the table"} for i, (c, s) in enumerate(words)]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": anns}))
    run("fid.py", "coco-captions", tmp_path / "captions_val2014.json", "--out", tmp_path / "coco6.txt", "--num", 6)
    captions = (tmp_path / "coco6.txt").read_text().splitlines()
    assert len(captions) == 6 and set(captions) <= {a["caption"] for a in anns}
    # 2. a tiny checkpoint, then one image per caption on 2 ranks (gloo)
    run("train.py", "--model=MicroDiT_test", "--dataset_size=64", "--max_steps=2", "--batch_size=4", "--eval_n=0",
        "--val_n=0", "--peak_flops=1e12", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}")
    ckpt = tmp_path / "run" / "ckpt-0000002"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "sample.py"), "--ckpt", str(ckpt), "--prompts-file",
                        str(tmp_path / "coco6.txt"), "--out", str(tmp_path / "coco6"), "--steps", "2",
                        "--batch-size", "2"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    files = [tmp_path / "coco6" / f"{i:06d}.png" for i in range(6)]
    assert all(f.exists() for f in files)
    assert (tmp_path / "coco6" / "prompts.txt").read_text().splitlines() == captions
    # 3. reference statistics, once, from a folder of "real" images
    (tmp_path / "val2014").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "val2014" / f"{i}.jpg")
    run("fid.py", tmp_path / "val2014", "--save-stats", tmp_path / "ref.npz", "--weights", weights, "--workers", 0)
    # 4. FID and CLIP score, in one JSON beside the samples
    ref_clip = tiny_hf_clip(tmp_path / "clip")
    run("fid.py", "protocol", tmp_path / "coco6", tmp_path / "ref.npz", "--clip-weights", tmp_path / "clip",
        "--weights", weights, "--workers", 0, "--device", "cpu")
    result = json.loads((tmp_path / "coco6_protocol.json").read_text())
    # against independent computations: the network's features in closed form, transformers' CLIPModel
    real = sorted((tmp_path / "val2014").iterdir())
    with torch.inference_mode():
        features = net(torch.stack([fid.load_image(f) for f in files + real])).double().numpy()
    assert result["fid"] == pytest.approx(low_rank_fid(features[:6], features[6:]), rel=1e-4)
    assert result["clip_score"] == pytest.approx(reference_score(ref_clip, tmp_path / "clip", files, captions)[0],
                                                 abs=1e-4)
    assert (result["num_images"], result["fid_mode"]) == (6, "bilinear")
    assert result["checkpoint"] == str(ckpt) and "--prompts-file" in result["sampling_command"]
    assert result["command"].startswith("python fid.py protocol ")
