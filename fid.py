"""Frechet Inception Distance from scratch: the FID InceptionV3, streaming feature statistics, the distance.

Matches pytorch-fid (SPEC D): the same network and weights file, the same preprocessing by default.
    python fid.py samples/ ref_stats.npz                      # FID of a folder against saved statistics
    python fid.py real/ --save-stats real.npz                 # statistics of one folder
    python fid.py coco-captions captions_val2014.json --out coco30k.txt   # captions of the COCO protocol
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from checkpoint import atomic_write, hub_file, load_state_dict, read_weights

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # torch.hub naming: name-<sha256 prefix>.pth
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
CACHE_DIR = Path(os.environ.get("MICRODIT_CACHE", Path.home() / ".cache" / "microdit")) / "fid"
IMAGE_EXTS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # as pytorch-fid
RES = 299  # input size of the TF InceptionV3 graph the weights were ported from

# -----------------------------------------------------------------------------
# The FID InceptionV3: the TF "2015-12-05" graph as ported by pytorch-fid. It differs from torchvision's
# InceptionV3 in its weights, a 1008-way fc, and the pooling of Mixed_5b..7c (see avg_pool_3x3, InceptionE).


class BatchNorm(nn.Module):
    """BatchNorm with frozen statistics and TF's eps 1e-3: FID only ever runs the network in eval mode."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


class BasicConv2d(nn.Module):
    """Conv (no bias: BN follows) -> BN -> ReLU; the 94 units named `<name>.conv.*`, `<name>.bn.*`."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # TF's average pool leaves the zero padding out of the mean (count_include_pad=False);
    # torchvision's does not.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooled branches at 35x35 (FID InceptionA)."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):  # (B, cin, 35, 35) -> (B, 224 + pool_features, 35, 35)
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35x35 -> 17x17 by strided 3x3 convs and a max pool."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):  # (B, 288, 35, 35) -> (B, 768, 17, 17)
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 7x7 convs factorised into 1x7 and 7x1 at 17x17 (FID InceptionC)."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):  # (B, 768, 17, 17) -> (B, 768, 17, 17)
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17x17 -> 8x8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):  # (B, 768, 17, 17) -> (B, 1280, 8, 8)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded 1x3 + 3x1 filter banks at 8x8 (FID InceptionE_1 with pool="avg",
    E_2 with "max")."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):  # (B, cin, 8, 8) -> (B, 2048, 8, 8)
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # The TF graph max-pools in its last block (Mixed_7c), most likely a slip; the weights expect it.
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else avg_pool_3x3(x)
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class InceptionV3(nn.Module):
    """The FID InceptionV3: images (B, 3, H, W) in [0, 1] -> 2048-d pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # The ImageNet classifier (1000 classes + 8 unused TF slots) plays no part in FID; it is kept so that
        # the state dict is exactly that of the released weights file.
        self.fc = nn.Linear(2048, 1008)
        self.initialize_weights()

    def initialize_weights(self):
        # Real use loads the released weights. He init keeps activations O(1) through the 94 units, so that
        # random-weight tests and benchmarks see realistic values (no vanishing, no denormals).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):  # x (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (RES, RES):  # pytorch-fid: bilinear, align_corners=False, no antialiasing
            x = F.interpolate(x, size=(RES, RES), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph takes [-1, 1]
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # pool3, the FID feature: (B, 2048)


# -----------------------------------------------------------------------------
# Weights: a local file, or downloaded once (release URL or a Hub repo)
# with the hash prefix in its name checked


def check_hash(path, name=None):
    """Raise unless the sha256 of `path` starts with the hex prefix in its name
    (torch.hub's `name-<prefix>.ext`)."""
    m = re.search(r"-([0-9a-f]{8,64})\.[^.]+$", name or Path(path).name)
    if m is None:
        return  # a name without a hash prefix (the user's own file): nothing to check against
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise ValueError(f"{path}: sha256 {h.hexdigest()[:12]}... does not start with {m.group(1)}, "
                         f"as the name (torch.hub's name-<sha256 prefix>.ext) says: "
                         f"a corrupt or wrong file; delete or rename it")


def fetch_weights(weights=None, repo_id=None, cache_dir=None):
    """Local path of the weights: a file, a URL (default: the release) cached in cache_dir,
    or a file of a Hub repo."""
    if repo_id is not None:  # `weights` is then the file name inside the repo
        path = hub_file(repo_id, weights or FID_WEIGHTS_NAME)
        if path is None:
            raise FileNotFoundError(f"{repo_id}: no {weights or FID_WEIGHTS_NAME} in this Hub repo")
        check_hash(path)
        return Path(path)
    weights = str(weights or FID_WEIGHTS_URL)
    if "://" not in weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"FID Inception weights not found: {path}")
        check_hash(path)
        return path
    cache_dir = Path(cache_dir or CACHE_DIR)
    path = cache_dir / Path(urllib.parse.urlparse(weights).path).name
    if path.is_file():
        check_hash(path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(path) as tmp:  # a partial download never takes the final name
            with open(tmp, "wb") as f, urllib.request.urlopen(weights) as r:
                size = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        f.write(chunk)
                        bar.update(len(chunk))
            check_hash(tmp, path.name)
    except OSError as e:
        if not isinstance(e.__cause__, urllib.error.URLError):
            raise
        raise ConnectionError(f"cannot download {weights} ({e.__cause__.reason}); fetch it by hand and pass "
                              f"--weights PATH, or put it in {cache_dir}") from None
    return path


def load_inception(weights=None, repo_id=None, cache_dir=None, device="cpu"):
    """The FID InceptionV3 with the released weights (see fetch_weights), frozen, in eval mode on `device`.
    The file may hold BatchNorm's num_batches_tracked counters, which FID does not use."""
    path = fetch_weights(weights, repo_id, cache_dir)
    sd = {k: v for k, v in read_weights(path).items() if not k.endswith("num_batches_tracked")}
    return load_state_dict(InceptionV3(), sd, path).to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Images -> preprocessed (3, 299, 299) tensors in [0, 1]


def list_images(folder):
    """The image files directly inside `folder` (extensions as pytorch-fid), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder of images: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no images ({' '.join(sorted(IMAGE_EXTS))}) in {folder}")
    return files


def center_crop(img, size):
    """The central square of a PIL image, resized to size x size with PIL bicubic
    (the COCO reference protocol)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    # Crop first: resize(box=...) would let the bicubic filter reach pixels outside the square.
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)


def load_image(path, resize="bilinear", crop=None):
    """One image file as a (3, 299, 299) float tensor in [0, 1], resized as pytorch-fid ("bilinear")
    or clean-fid."""
    with Image.open(path) as img:
        img = img.convert("RGB")  # grayscale, palette, CMYK -> RGB; RGBA drops alpha, as pytorch-fid does
    if crop:
        img = center_crop(img, crop)
    x = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    if resize == "clean":
        # clean-fid: antialiased PIL bicubic on each channel in float ("F" images), so no uint8 rounding.
        chans = [Image.fromarray(np.ascontiguousarray(x[..., c])).resize((RES, RES), Image.Resampling.BICUBIC)
                 for c in range(3)]
        return torch.from_numpy(np.stack([np.asarray(c) for c in chans]).clip(0, 255) / 255)
    if resize != "bilinear":
        raise ValueError(f"resize must be 'bilinear' (pytorch-fid) or 'clean' (clean-fid), got {resize!r}")
    x = torch.from_numpy(x / 255).permute(2, 0, 1)  # (3, H, W)
    if x.shape[-2:] != (RES, RES):  # what pytorch-fid's model does to each batch
        x = F.interpolate(x[None], size=(RES, RES), mode="bilinear", align_corners=False)[0]
    return x


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> preprocessed (3, 299, 299) tensors, decoded in the DataLoader workers."""

    def __init__(self, files, resize="bilinear", crop=None):
        self.files, self.resize, self.crop = files, resize, crop

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return load_image(self.files[i], self.resize, self.crop)
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{self.files[i]}: cannot read image: {e}") from e


# -----------------------------------------------------------------------------
# Feature statistics and the Frechet distance


class RunningStats:
    """Mean and covariance of feature rows, accumulated batch by batch in float64 without keeping the rows."""

    def __init__(self, dim):
        # m2: sum of centred outer products
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, x):  # x (B, dim)
        x = np.asarray(x, dtype=np.float64)
        b, mean_b = len(x), x.mean(0)
        xc = x - mean_b
        delta, n = mean_b - self.mean, self.n + b
        # Chan et al.'s pairwise merge of centred sums: no cancellation of sum(x x^T) - n mu mu^T
        # when |mu| >> std.
        self.m2 += xc.T @ xc + np.outer(delta, delta) * (self.n * b / n)
        self.mean += delta * (b / n)
        self.n = n

    def stats(self):
        """(mu (D,), sigma (D, D)) with the unbiased 1/(n-1) covariance, as numpy.cov."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def compute_stats(folder, net, batch_size=50, device="cpu", workers=0, resize="bilinear", crop=None,
                  progress=True):
    """(mu, sigma) of the features net(x) of every image in `folder`, streamed batch by batch."""
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least 2 images to estimate a covariance, "
                         f"found {len(files)}")
    if len(files) < 2048:
        warnings.warn(f"{folder}: only {len(files)} images; with fewer than 2048 the feature covariance is "
                      f"singular and FID is biased high (the COCO protocol uses 30K)", stacklevel=2)
    loader = torch.utils.data.DataLoader(ImageFiles(files, resize, crop), batch_size=batch_size,
                                         num_workers=workers, pin_memory=str(device).startswith("cuda"))
    stats = None
    with torch.inference_mode(), tqdm(total=len(files), unit="img", desc=f"FID features {folder}",
                                      disable=not progress) as bar:
        for x in loader:  # (B, 3, 299, 299)
            f = net(x.to(device)).double().cpu().numpy()  # (B, 2048)
            if stats is None:
                stats = RunningStats(f.shape[1])
            stats.update(f)
            bar.update(len(x))
    return stats.stats()


def save_stats(path, mu, sigma):
    """Write mu and sigma to an .npz (pytorch-fid's format), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"statistics file must end in .npz: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file object, so numpy does not append its own .npz
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path):
    """(mu, sigma) in float64 from an .npz written by save_stats or pytorch-fid."""
    with np.load(path) as f:  # allow_pickle=False: arrays only
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.keys())}")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = len(mu1) if mu1.ndim == 1 else 0
    if d == 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; expected mu (D,) and sigma (D, D)")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    diff = mu1 - mu2
    # S1 S2 is similar to S1^1/2 S2 S1^1/2, which is PSD, so tr sqrt(S1 S2) is the sum of the square roots
    # of its eigenvalues. They come out slightly negative or complex from rounding (always, when n < D
    # makes S singular): the real part of the complex root drops those, where scipy's sqrtm can fail with
    # imaginary components.
    eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_covmean = np.sqrt(eig).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# -----------------------------------------------------------------------------
# The zero-shot COCO protocol (SPEC D): 30K captions of COCO 2014 val -> one sample each
# -> FID against val2014


def coco_captions(annotations, num=30000, seed=0):
    """`num` captions drawn at random without replacement from a COCO captions_*.json,
    one per line-safe string."""
    with open(annotations) as f:
        anns = json.load(f)["annotations"]
    if num > len(anns):
        raise ValueError(f"{annotations}: asked for {num} captions, the file has {len(anns)}")
    # a fixed order first, so that a seed always picks the same captions
    anns = sorted(anns, key=lambda a: a["id"])
    # whitespace collapsed: no stray newlines
    return [" ".join(a["caption"].split()) for a in random.Random(seed).sample(anns, num)]


def coco_captions_main(argv):
    """CLI: python fid.py coco-captions captions_val2014.json --out coco30k.txt [--num 30000 --seed 0]"""
    p = argparse.ArgumentParser(prog="fid.py coco-captions",
                                description="Captions file for zero-shot COCO FID.")
    p.add_argument("annotations", help="COCO captions_val2014.json")
    p.add_argument("--out", required=True, help="text file, one caption per line (input of sample.py)")
    p.add_argument("--num", type=int, default=30000, help="number of captions (SPEC D: 30K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    args = p.parse_args(argv)
    captions = coco_captions(args.annotations, args.num, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        Path(tmp).write_text("\n".join(captions) + "\n")
    print(f"wrote {len(captions)} captions to {args.out}")


# -----------------------------------------------------------------------------


def main(argv=None):
    """CLI: python fid.py A B  |  python fid.py A --save-stats OUT.npz
    (A, B: image folders or .npz statistics)"""
    p = argparse.ArgumentParser(description="FID between two image folders or .npz statistics "
                                            "(as pytorch-fid).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="folder of images or .npz with mu and sigma")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of the first PATH")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    p.add_argument("--resize", choices=["bilinear", "clean"], default="bilinear",
                   help="to 299x299: bilinear as pytorch-fid, or clean-fid's PIL bicubic")
    p.add_argument("--center-crop", type=int, metavar="SIZE",
                   help="first crop folder images to their central square and resize to SIZE (COCO: 256)")
    p.add_argument("--weights", help=f"local .pth/.safetensors or URL (default: the release, cached in "
                                     f"{CACHE_DIR}); with --weights-repo, the file name in the repo")
    p.add_argument("--weights-repo", help="Hugging Face Hub repo holding the weights file")
    args = p.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.save_stats):
        p.error("give two PATHs to compare, or one PATH with --save-stats")
    for path in args.paths:  # before any weights are fetched
        if not (path.endswith(".npz") and Path(path).is_file()) and not Path(path).is_dir():
            p.error(f"{path} is neither a folder of images nor an existing .npz statistics file")
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs would shift FID; the reference numbers are float32

    net = None
    stats = []
    for path in args.paths:
        if path.endswith(".npz"):
            stats.append(load_stats(path))
            continue
        if net is None:  # only folders need the network
            net = load_inception(args.weights, args.weights_repo, device=args.device)
        stats.append(compute_stats(path, net, args.batch_size, args.device, args.workers, args.resize,
                                   args.center_crop))
    if args.save_stats:
        save_stats(args.save_stats, *stats[0])
        print(f"saved statistics of {args.paths[0]} to {args.save_stats}")
    if len(stats) == 2:
        print(f"FID: {frechet_distance(*stats[0], *stats[1]):.6f}")


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["coco-captions"]:
            coco_captions_main(sys.argv[2:])
        else:
            main()
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        sys.exit(f"fid.py: error: {e}")
