"""Tests of fid.py: the distance against closed forms, streaming statistics, the network, weights, the CLI."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from conftest import REFERENCE, ROOT

REFERENCE_KEYS = REFERENCE / "fid_inception_keys.json"  # the names and shapes of pytorch-fid's weights file


def random_spd(rng, d, cond=10.0):
    """A random symmetric positive definite matrix with eigenvalues in [1, cond]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * rng.uniform(1, cond, d)) @ q.T


def random_net(seed=0):
    """The FID InceptionV3 with random weights and randomised BN statistics (the real weights are not here)."""
    torch.manual_seed(seed)
    net = fid.InceptionV3().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, fid.BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net


def hash_named(src, folder, wrong=False):
    """Copy `src` to folder/pt_inception-2015-12-05-<sha256 prefix>.pth (a wrong prefix if asked)."""
    prefix = hashlib.sha256(Path(src).read_bytes()).hexdigest()[:8]
    if wrong:
        prefix = "0" * 8 if prefix != "0" * 8 else "1" * 8
    dst = Path(folder) / f"pt_inception-2015-12-05-{prefix}.pth"
    shutil.copy(src, dst)
    return dst


def write_images(folder, n, seed, bright=0.0, size=(40, 32)):
    """n smooth random RGB images (upsampled noise) as PNG; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = (rng.random((4, 5, 3)) * (1 - bright) + bright) * 255
        img = Image.fromarray(low.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        img.save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def net():
    return random_net()


@pytest.fixture(scope="module")
def weights_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


# -----------------------------------------------------------------------------
# The Frechet distance (Heusel et al. 2017) against its closed forms


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    s, mu1, mu2 = random_spd(rng, 32), rng.standard_normal(32), rng.standard_normal(32)
    assert fid.frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


@pytest.mark.parametrize("rotate", [False, True])
def test_diagonal_covariances(rotate):
    rng = np.random.default_rng(1)
    d = 48
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = np.diag(a), np.diag(b)
    if rotate:  # one orthogonal Q for both leaves the distance unchanged
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        s1, s2, mu1, mu2 = q @ s1 @ q.T, q @ s2 @ q.T, q @ mu1, q @ mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("c", [0.5, 3.0])
def test_scaled_covariance(c):
    rng = np.random.default_rng(2)
    s, mu = random_spd(rng, 40), rng.standard_normal(40)
    assert fid.frechet_distance(mu, s, mu, c**2 * s) == pytest.approx(np.trace(s) * (1 - c) ** 2, rel=1e-8)


def test_self_distance_is_zero():
    rng = np.random.default_rng(3)
    s, mu = random_spd(rng, 64, cond=100), rng.standard_normal(64)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)


def test_eigenvalue_path_matches_scipy_sqrtm():
    rng = np.random.default_rng(4)
    for d in (8, 64):
        s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=30)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        covmean = scipy.linalg.sqrtm(s1 @ s2)  # the pytorch-fid way, kept here as the cross-check
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_distance_rejects_bad_statistics():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="NaN"):
        fid.frechet_distance(mu, s, mu, np.full((4, 4), np.nan))


# -----------------------------------------------------------------------------
# Streaming statistics


def test_running_stats_equal_numpy_on_full_matrix():
    rng = np.random.default_rng(5)
    # A large common offset: the naive sum(x x^T) - n mu mu^T would lose ~8 digits here.
    x = 1e3 + rng.standard_normal((1000, 64)) @ rng.standard_normal((64, 64))
    stats = fid.RunningStats(64)
    for chunk in np.split(x, [1, 3, 50, 51, 400, 999]):  # uneven batches, including single rows
        stats.update(chunk)
    mu, sigma = stats.stats()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=0)
    ref = np.cov(x, rowvar=False)
    np.testing.assert_allclose(sigma, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


@pytest.mark.filterwarnings("ignore:.*2048")
@pytest.mark.parametrize("batch_size", [3, 100])
def test_compute_stats_streams_exactly(tmp_path, batch_size):
    folder = write_images(tmp_path / "imgs", 7, seed=6)

    def features(x):  # (B, 3, 299, 299) -> (B, 48): a stand-in for the network, far from zero mean
        return 100 + 10 * F.adaptive_avg_pool2d(x, 4).flatten(1)

    mu, sigma = fid.compute_stats(folder, features, batch_size=batch_size, progress=False)
    allx = torch.stack([fid.load_image(f) for f in fid.list_images(folder)])
    f = features(allx).double().numpy()  # (7, 48): every feature at once, the reference
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-10, atol=0)
    ref = np.cov(f, rowvar=False)
    np.testing.assert_allclose(sigma, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_stats_npz_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.standard_normal(5), random_spd(rng, 5)
    fid.save_stats(tmp_path / "s.npz", mu, sigma)
    with np.load(tmp_path / "s.npz") as f:  # pytorch-fid's format (mu, sigma), plus the mode
        assert sorted(f.files) == ["mode", "mu", "sigma"] and str(f["mode"]) == "bilinear"
    mu2, sigma2, mode = fid.load_stats(tmp_path / "s.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mode == "bilinear"
    fid.save_stats(tmp_path / "c.npz", mu, sigma, mode="clean")
    assert fid.load_stats(tmp_path / "c.npz")[2] == "clean"
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's own file: its mode
    assert fid.load_stats(tmp_path / "pytorch_fid.npz")[2] == "bilinear"
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "odd.npz", mu=mu, sigma=sigma, mode=np.array("legacy_tensorflow"))
    with pytest.raises(ValueError, match="odd.npz: unknown FID mode 'legacy_tensorflow'"):
        fid.load_stats(tmp_path / "odd.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "s.npz").read_bytes()[:100])  # a truncated download
    with pytest.raises(ValueError, match="cut.npz: not a readable .npz file"):
        fid.load_stats(tmp_path / "cut.npz")
    with pytest.raises(ValueError, match=".npz"):
        fid.save_stats(tmp_path / "s.txt", mu, sigma)


def test_too_few_images(tmp_path, capsys):
    def features(x):
        return x.mean((2, 3))

    with pytest.raises(ValueError, match="at least 2 images"):
        fid.compute_stats(write_images(tmp_path / "one", 1, seed=0), features, progress=False)
    fid.compute_stats(write_images(tmp_path / "three", 3, seed=0), features, progress=False)
    err = capsys.readouterr().err  # one line, as the errors
    assert err.startswith("warning: ") and "fewer than 2048" in err and err.count("\n") == 1, err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        fid.compute_stats(tmp_path / "empty", features)


# -----------------------------------------------------------------------------
# Preprocessing


def test_bilinear_resize_is_pytorch_fid(tmp_path):
    # A horizontal ramp: bilinear interpolation reproduces it exactly at the source coordinate
    # (j + 0.5) * W / 299 - 0.5 of align_corners=False, clamped at the borders.
    w = 64
    ramp = np.tile((4 * np.arange(w)).astype(np.uint8), (10, 1))  # (10, 64), values 0..252
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = fid.load_image(tmp_path / "ramp.png")  # the network's input: 2 x / 255 - 1, as pytorch-fid scales it
    src = np.clip((np.arange(fid.RES) + 0.5) * w / fid.RES - 0.5, 0, w - 1)
    assert x.shape == (3, 299, 299)
    np.testing.assert_allclose(x[1, 150].numpy(), 2 * (4 * src / 255) - 1, atol=1e-6)
    np.testing.assert_allclose(x[0].numpy(), x[2].numpy(), atol=0)  # gray -> equal channels


def test_clean_resize_is_pil_bicubic(tmp_path):
    rng = np.random.default_rng(8)
    # Upsampling, and downsampling where PIL's antialiasing matters. Smooth images (upsampled noise) in [40, 215]:
    # bicubic overshoots stay inside [0, 255], so nothing is clipped.
    for size, low_size in [((70, 50), (32, 24)), ((600, 450), (80, 60))]:
        low = rng.integers(40, 216, (low_size[1], low_size[0], 3), dtype=np.uint8)
        Image.fromarray(low).resize(size, Image.Resampling.BILINEAR).save(tmp_path / "smooth.png")
        img = Image.open(tmp_path / "smooth.png")
        clean = fid.load_image(tmp_path / "smooth.png", resize="clean").numpy()
        assert clean.shape == (3, 299, 299) and clean.dtype == np.float32
        clean = clean * 128 + 128  # back to pixel levels: clean-fid feeds (x - 128) / 128
        # PIL's own uint8 bicubic differs from clean-fid's float one only by rounding (its two passes round).
        ref = np.asarray(img.resize((299, 299), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1)
        assert np.abs(clean - ref).max() < 1.5 and np.abs(clean - ref).mean() < 0.5
        # ... while the default (pytorch-fid) resize is several levels away: the tolerance tells them apart.
        assert np.abs((fid.load_image(tmp_path / "smooth.png").numpy() + 1) * 127.5 - ref).max() > 3
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    noise = tmp_path / "noise.png"
    assert (fid.load_image(noise, resize="clean") - fid.load_image(noise)).abs().max() > 0.05
    # At 299x299 neither mode resizes: both give the pixels, each scaled its own way.
    Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "b.png"), dtype=np.float32)).permute(2, 0, 1)
    assert torch.allclose(fid.load_image(tmp_path / "b.png"), pixels / 127.5 - 1, atol=1e-6)
    assert torch.allclose(fid.load_image(tmp_path / "b.png", resize="clean"), (pixels - 128) / 128, atol=1e-6)
    with pytest.raises(ValueError, match="resize"):
        fid.load_image(tmp_path / "b.png", resize="nearest")


def test_grayscale_and_rgba_become_rgb(tmp_path):
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "gray3.png")
    Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], -1)).save(
        tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert Image.open(tmp_path / "gray.png").mode == "L" and Image.open(tmp_path / "rgba.png").mode == "RGBA"
    assert torch.equal(fid.load_image(tmp_path / "gray.png"), fid.load_image(tmp_path / "gray3.png"))
    assert torch.equal(fid.load_image(tmp_path / "rgba.png"), fid.load_image(tmp_path / "rgb.png"))


def test_center_crop_keeps_the_middle(tmp_path):
    x = np.zeros((10, 30, 3), dtype=np.uint8)
    x[:, :10, 0], x[:, 10:20, 1], x[:, 20:, 2] = 255, 255, 255  # red | green | blue
    Image.fromarray(x).save(tmp_path / "wide.png")
    out = fid.load_image(tmp_path / "wide.png", crop=16)  # crop to the green square, 16x16, then to 299
    assert torch.allclose(out[1], torch.ones(299, 299), atol=1e-6) and (out[[0, 2]] + 1).abs().max() < 1e-6


# -----------------------------------------------------------------------------
# The network and its weights


def test_state_dict_matches_reference_file_layout(net):
    ref = json.loads(REFERENCE_KEYS.read_text())
    sd = net.state_dict()
    assert list(sd) == list(ref)  # names and order of pt_inception-2015-12-05-6726825d.pth (472 entries)
    assert {k: list(v.shape) for k, v in sd.items()} == ref
    assert sum(k.endswith(".conv.weight") for k in sd) == 94 and sd["fc.weight"].shape == (1008, 2048)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 94 and all(c.bias is None for c in convs)


def test_weights_load_with_or_without_num_batches_tracked(net, tmp_path):
    # Without: test_load_inception_from_cached_url. With: the BN counters that a file saved from torchvision has.
    sd = net.state_dict()
    counters = {k.replace("running_mean", "num_batches_tracked"): torch.tensor(0) for k in sd if "running_mean" in k}
    assert len(counters) == 94
    torch.save(dict(sd, **counters), tmp_path / "with_counters.pth")
    other = fid.load_inception(tmp_path / "with_counters.pth")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))
    torch.save({k: v for k, v in sd.items() if k != "fc.bias"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short.pth: weights do not fit the model: 1 missing \['fc.bias'\]"):
        fid.load_inception(tmp_path / "short.pth")
    torch.save(dict(sd, **{"fc.bias": torch.zeros(1000)}), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd.pth: .*1 of wrong shape \['fc.bias: \(1000,\) vs model \(1008,\)'\]"):
        fid.load_inception(tmp_path / "odd.pth")


def test_features_deterministic_and_independent_of_batch_size(net):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 299, 299)
    with torch.inference_mode():
        f = net(x)
        again = net(x)
        single = torch.cat([net(x[i:i + 1]) for i in range(len(x))])
    assert f.shape == (2, 2048)
    assert f.std() > 0.1  # the random net is not trivially ~0 (that would pass any tolerance)
    scale = f.abs().max()
    assert (again - f).abs().max() <= 1e-5 * scale
    assert (single - f).abs().max() <= 1e-5 * scale


def test_fetch_weights_downloads_once_and_checks_hash(tmp_path):
    (tmp_path / "release").mkdir()
    torch.save({"w": torch.randn(10)}, tmp_path / "small.pth")
    good = hash_named(tmp_path / "small.pth", tmp_path / "release")
    bad = hash_named(tmp_path / "small.pth", tmp_path / "release", wrong=True)
    cache = tmp_path / "cache"
    path = fid.fetch_weights(good.as_uri(), cache_dir=cache)  # the urllib download path, from a file:// URL
    assert path == cache / good.name and path.read_bytes() == good.read_bytes()
    good.unlink()  # the second call must not need the URL
    assert fid.fetch_weights(good.as_uri(), cache_dir=cache) == path
    with pytest.raises(ValueError, match="sha256"):
        fid.fetch_weights(bad.as_uri(), cache_dir=cache)
    with pytest.raises(ConnectionError, match="cannot download"):
        fid.fetch_weights((tmp_path / "release" / "gone.pth").as_uri(), cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [good.name]  # the failed downloads left nothing behind
    with pytest.raises(ValueError, match="sha256"):  # nor is a local file with a wrong name accepted
        fid.fetch_weights(bad)
    path.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        fid.fetch_weights(good.as_uri(), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="not found"):
        fid.fetch_weights(tmp_path / "missing.pth")


def test_fetch_weights_from_hub_repo_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--fid-inception"  # the Hub cache layout
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.save({"w": torch.randn(10)}, tmp_path / "small.pth")
    good = hash_named(tmp_path / "small.pth", repo / "snapshots" / commit)
    bad = hash_named(tmp_path / "small.pth", repo / "snapshots" / commit, wrong=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = fid.fetch_weights(good.name, repo_id="someone/fid-inception")
    assert path.read_bytes() == good.read_bytes()
    with pytest.raises(ValueError, match="sha256"):
        fid.fetch_weights(bad.name, repo_id="someone/fid-inception")
    with pytest.raises(FileNotFoundError, match="someone/fid-inception: no other.pth"):
        fid.fetch_weights("other.pth", repo_id="someone/fid-inception")


def test_load_inception_from_cached_url(net, weights_file, tmp_path):
    (tmp_path / "release").mkdir()
    url = hash_named(weights_file, tmp_path / "release").as_uri()
    loaded = fid.load_inception(url, cache_dir=tmp_path / "cache")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


# -----------------------------------------------------------------------------
# End to end: the CLI on folders of generated images, with the real 299x299 network


def run_cli(*args):
    # One thread for OpenBLAS: its threads spin badly on a busy 2-core machine, and each run takes the eigenvalues
    # of a 2048x2048 matrix.
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "fid.py"), *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.slow
def test_cli_end_to_end(weights_file, tmp_path):
    # Two images each, the fewest allowed (every image is a forward pass of the full network on CPU).
    a = write_images(tmp_path / "A", 2, seed=10)
    b = write_images(tmp_path / "B", 2, seed=11, bright=0.5, size=(32, 32))
    Image.open(a / "000.png").convert("L").save(a / "000.png")  # grayscale and RGBA files among the inputs
    Image.open(a / "001.png").convert("RGBA").save(a / "001.png")
    opts = ["--weights", weights_file, "--workers", "0", "--batch-size", "1", "--device", "cpu"]

    code, out, err = run_cli(a, b, "--save-stats", tmp_path / "a.npz", *opts)
    assert code == 0, err
    assert "fewer than 2048" in err  # the small-sample warning
    fid_ab = float(re.search(r"FID: (\S+)", out).group(1))
    assert np.isfinite(fid_ab) and fid_ab > 0

    code, out, err = run_cli(tmp_path / "a.npz", b, *opts)  # the saved statistics stand in for A
    assert code == 0, err
    assert float(re.search(r"FID: (\S+)", out).group(1)) == pytest.approx(fid_ab, rel=1e-6)

    code, out, err = run_cli(a, tmp_path / "a.npz", *opts)  # FID(A, A): A recomputed against its saved stats
    assert code == 0, err
    mu, sigma, _ = fid.load_stats(tmp_path / "a.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    # ~0: with 2 images the covariance has rank 1, and the rounding of the 2047 zero eigenvalues of S S
    # (each ~eps |S|^2, square-rooted) leaves a residue of ~1e-5 tr(S).
    assert abs(float(re.search(r"FID: (\S+)", out).group(1))) < 1e-4 * np.trace(sigma)
    assert fid_ab > 1e-2 * np.trace(sigma)  # while A and B are far apart on that scale


@pytest.mark.slow
def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "missing"), str(tmp_path / "b.npz")])
    assert e.value.code == 2 and "neither a folder of images nor an existing .npz" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(SystemExit) as e:
        fid.main([str(tmp_path / "x.npz")])
    assert e.value.code == 2 and "--save-stats" in capsys.readouterr().err
    np.savez(tmp_path / "y.npz", mu=np.zeros(4), sigma=np.eye(4))
    code, _, err = run_cli(tmp_path / "x.npz", tmp_path / "y.npz")  # bad input: one line, no traceback
    assert code == 1 and err.startswith("fid.py: error: statistics do not match") and err.count("\n") == 1


# -----------------------------------------------------------------------------
# The COCO protocol's captions file


def test_coco_captions(tmp_path):
    anns = [{"id": i, "image_id": i // 2, "caption": f"A  caption\nnumber {i} "} for i in range(10)]
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"annotations": anns[::-1]}))
    fid.coco_captions_main([str(tmp_path / "captions_val2014.json"), "--num", "4", "--out", str(tmp_path / "c.txt")])
    lines = (tmp_path / "c.txt").read_text().splitlines()
    assert len(lines) == 4 == len(set(lines))
    assert all(re.fullmatch(r"A caption number \d", line) for line in lines)  # one line each, whitespace tidied
    assert fid.coco_captions(tmp_path / "captions_val2014.json", 4) == lines  # same seed, same captions
    assert fid.coco_captions(tmp_path / "captions_val2014.json", 4, seed=1) != lines
    with pytest.raises(ValueError, match="has 10"):
        fid.coco_captions(tmp_path / "captions_val2014.json", 11)


# -----------------------------------------------------------------------------
# The two FID modes: what the network is fed, and statistics of different modes never compared


def clean_fid_input(path):
    """clean-fid's clean mode, written from its definition: PIL bicubic on each channel as a float ("F") image
    to 299x299, clipped to [0, 255], then (x - 128) / 128. (3, 299, 299) float32."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    chans = [Image.fromarray(x[..., c].copy(), mode="F").resize((299, 299), Image.Resampling.BICUBIC)
             for c in range(3)]
    chans = [np.asarray(c) for c in chans]
    return (np.stack(chans).clip(0, 255) - 128) / 128


def pytorch_fid_input(path):
    """pytorch-fid's preprocessing: [0, 1] pixels, bilinear to 299 (align_corners=False), then 2x - 1."""
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return (2 * F.interpolate(x[None], size=(299, 299), mode="bilinear", align_corners=False)[0] - 1).numpy()


@pytest.mark.filterwarnings("ignore:.*2048")
@pytest.mark.parametrize("mode,reference", [("clean", clean_fid_input), ("bilinear", pytorch_fid_input)])
def test_network_input_is_the_modes_definition(net, tmp_path, mode, reference):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(12)
    # noise (bicubic overshoots past 0 and 255: the clip matters), a smooth upsampled image and a large one
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "a.png")
    write_images(tmp_path / "smooth", 1, seed=13, size=(96, 80))
    shutil.copy(tmp_path / "smooth" / "000.png", folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (420, 380, 3), dtype=np.uint8)).save(folder / "c.png")
    seen = []  # what the first convolution of the FID InceptionV3 receives, through the real data path
    hook = net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        fid.compute_stats(folder, net, batch_size=3, resize=mode, progress=False)
    finally:
        hook.remove()
    got = seen[0].numpy()
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        ref = reference(folder / name)
        assert np.abs(got[i] - ref).max() < 1e-5, (name, np.abs(got[i] - ref).max())
    if mode == "clean":  # the two scalings differ: 2x/255 - 1 would be off by up to 1/255 here
        assert np.abs(got[0] - ((ref * 128 + 128) / 127.5 - 1)).max() > 0.5 / 255


@pytest.mark.slow
def test_statistics_of_different_modes_are_refused(tmp_path):
    rng = np.random.default_rng(14)
    mu, sigma = rng.standard_normal(4), random_spd(rng, 4)
    fid.save_stats(tmp_path / "ref_clean.npz", mu, sigma, mode="clean")
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # no mode field: pytorch-fid's own, "bilinear"
    code, out, err = run_cli(tmp_path / "pytorch_fid.npz", tmp_path / "ref_clean.npz")
    assert code == 2 and err.count("\n") == 1 and "FID:" not in out  # 2: the command must change its inputs
    assert re.fullmatch(r"fid\.py: error: \S*pytorch_fid\.npz is in FID mode 'bilinear' and "
                        r"\S*ref_clean\.npz in mode 'clean': .*\n", err), err
    write_images(tmp_path / "A", 2, seed=15)  # a folder is in --resize's mode; refused before any weights
    with pytest.raises(ValueError, match=r"A is in FID mode 'bilinear' and \S*ref_clean.npz in mode 'clean'"):
        fid.main([tmp_path / "A", tmp_path / "ref_clean.npz", "--weights", tmp_path / "none.pth"])
    fid.save_stats(tmp_path / "ref_bilinear.npz", mu + 1, sigma)  # the same mode: compared
    code, out, err = run_cli(tmp_path / "pytorch_fid.npz", tmp_path / "ref_bilinear.npz",
                             "--out", tmp_path / "r.json")
    assert code == 0 and float(re.search(r"FID: (\S+)", out).group(1)) == pytest.approx(4.0, rel=1e-6)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["fid"] == pytest.approx(4.0, rel=1e-6) and result["fid_mode"] == "bilinear"


# -----------------------------------------------------------------------------
# Sample folders (prompts.txt), damaged images, --help


def sample_folder(folder, n, seed=0, extra=True):
    """A folder as sample.py writes it: prompts.txt (line i: caption of image i), 000000.png ..., grid.png;
    plus a stray image that no line describes."""
    write_images(folder, n, seed)
    for i in range(n):
        (folder / f"{i:03d}.png").rename(folder / f"{i:06d}.png")
    (folder / "prompts.txt").write_text("".join(f"caption {i}\n" for i in range(n)))
    if extra:
        Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "grid.png")
        Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / f"{n:06d}.png")  # left over from an older run
        Image.new("RGB", (20, 20), (0, 255, 0)).save(folder / "other.jpg")
    return folder


@pytest.mark.filterwarnings("ignore:.*2048")
def test_sample_folder_reads_only_the_images_of_prompts_txt(tmp_path):
    folder = sample_folder(tmp_path / "samples", 3)
    described = [folder / f"{i:06d}.png" for i in range(3)]
    assert fid.list_images(folder) == described
    seen = []

    def features(x):  # (B, 3, 299, 299) -> (B, 3): records what was read
        seen.append(x)
        return x.mean((2, 3))

    fid.compute_stats(folder, features, batch_size=2, progress=False)
    got = torch.cat(seen)
    assert len(got) == 3 and torch.equal(got, torch.stack([fid.load_image(f) for f in described]))
    files, captions = fid.images_and_captions(folder)
    assert files == described and captions == ["caption 0", "caption 1", "caption 2"]
    (folder / "prompts.txt").unlink()  # without prompts.txt: every image file directly inside, as before
    assert [f.name for f in fid.list_images(folder)] == ["000000.png", "000001.png", "000002.png",
                                                         "000003.png", "grid.png", "other.jpg"]
    (folder / "prompts.txt").write_text("a\nb\nc\nd\ne\n")  # five lines, four numbered images
    with pytest.raises(FileNotFoundError, match=r"000004.png: no such image, but \S*prompts.txt describes 5"):
        fid.list_images(folder)
    with pytest.raises(ValueError, match=r"caps.txt: 2 captions for the 5 images"):
        (tmp_path / "caps.txt").write_text("x\ny\n")
        (folder / "000004.png").write_bytes((folder / "000000.png").read_bytes())
        fid.images_and_captions(folder, tmp_path / "caps.txt")


@pytest.mark.slow
def test_damaged_image_is_one_line_with_workers(weights_file, tmp_path):
    folder = write_images(tmp_path / "imgs", 4, seed=16)
    good = (folder / "001.png").read_bytes()
    (folder / "001.png").write_bytes(good[:len(good) // 2])  # truncated
    (folder / "003.png").write_text("not an image")
    code, out, err = run_cli(folder, "--save-stats", tmp_path / "s.npz", "--weights", weights_file,
                             "--workers", 2, "--batch-size", 2, "--device", "cpu")
    assert code == 1 and "Traceback" not in err and not (tmp_path / "s.npz").exists(), err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0] == err.rstrip("\n").split("\n")[-1], err
    name = re.escape(str(folder / "001.png"))
    assert re.fullmatch(rf"fid\.py: error: {name}: cannot read image \(OSError: .*\)", errors[0]), errors[0]
    # the same message in-process, from the other file
    with pytest.raises(ValueError, match=r"003.png: cannot read image \(UnidentifiedImageError: "):
        list(fid.image_batches([folder / "000.png", folder / "003.png"], fid.load_image, 2, workers=1))


@pytest.mark.slow
def test_help_lists_every_command_and_flag_with_its_default(capsys):
    r = subprocess.run([sys.executable, str(ROOT / "fid.py"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    sections = re.split(r"^=== fid\.py (\S+) ===$", r.stdout, flags=re.M)
    assert sections[1::2] == ["coco-captions", "clip-score", "protocol"]
    parsers = [fid.fid_parser()] + [fid.SUBCOMMANDS[name][0]() for name in sections[1::2]]
    for text, parser in zip(sections[::2], parsers):
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert all(a.option_strings[-1] in text for a in flags)
        text = " ".join(text.split())  # argparse wraps lines
        assert text.count("(default: ") == len(flags)  # one default per flag (positionals have none)
    assert "(default: bilinear)" in r.stdout and "(default: 30000)" in r.stdout
    assert "(default: openai/clip-vit-large-patch14)" in r.stdout
    for name in ("clip-score", "protocol", "coco-captions"):
        with pytest.raises(SystemExit) as e:
            fid.main([name, "--help"])
        assert e.value.code == 0 and f"usage: fid.py {name}" in capsys.readouterr().out
