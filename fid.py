"""Frechet Inception Distance from scratch: the FID InceptionV3, streaming feature statistics, the distance;
and the CLIP score, the second number of the COCO protocol.

FID (Heusel et al. 2017) matches pytorch-fid (the same network and weights file) or, with --resize clean,
clean-fid's clean mode (Parmar et al. 2022); the CLIP score (Hessel et al. 2021), torchmetrics' CLIPScore.
    python fid.py samples/ ref_stats.npz                      # FID of a folder against saved statistics
    python fid.py real/ --save-stats real.npz                 # statistics of one folder
    python fid.py coco-captions captions_val2014.json --out coco30k.txt   # captions of the COCO protocol
    python fid.py clip-score samples/                         # CLIP score of samples against their prompts
    python fid.py protocol samples/ ref_stats.npz             # both, in samples_protocol.json
"""
import argparse
import functools
import hashlib
import json
import os
import random
import re
import shlex
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from checkpoint import atomic_write, hub_file, load_state_dict, read_json, read_weights, write_json
from config import UsageError
from encoders import OPENAI_CLIP_L, check_hub, clip_preprocess, load_clip

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
    """The FID InceptionV3: images (B, 3, 299, 299) in [-1, 1] (load_image) -> pool3 features (B, 2048)."""

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

    def forward(self, x):  # x (B, 3, 299, 299) in [-1, 1], the TF graph's input, as load_image makes it
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
        check_hub(repo_id, "--weights PATH (a local file, without --weights-repo)")
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
                size = int(r.headers.get("Content-Length") or 0)  # 0: the server did not say
                desc = f"downloading {path.name}"
                with tqdm(total=size or None, unit="B", unit_scale=True, desc=desc) as bar:
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
# Images -> the network's input (3, 299, 299) in [-1, 1], in one of two modes (--resize). Their FIDs are not
# comparable with each other, so every .npz and result JSON records its mode:
#   "bilinear" (default): pytorch-fid's, the protocol of pytorch-fid's and torch-fidelity's numbers (but for
#       torch-fidelity's TF 1.x-style bilinear kernel): [0, 1] pixels resized bilinearly to 299
#       (align_corners=False, no antialiasing), then 2x - 1.
#   "clean": clean-fid's clean mode (Parmar et al. 2022; its compute_fid(mode="clean") numbers): PIL bicubic,
#       antialiased, on each channel in float, clipped to [0, 255], then (x - 128) / 128.
FID_MODES = ("bilinear", "clean")


def list_images(folder):
    """The images of a folder: a sample folder (with sample.py's prompts.txt) has 000000.png, 000001.png, ...,
    one per line, and nothing else counts (grid.png); any other folder: every image file directly inside
    (extensions as pytorch-fid), sorted."""
    folder = Path(folder)
    prompts = folder / "prompts.txt"
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder of images: {folder}")
    if prompts.is_file():
        files = [folder / f"{i:06d}.png" for i in range(len(prompts.read_text("utf-8").splitlines()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: no such image, but {prompts} describes {len(files)} "
                                        f"(000000.png ...)")
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        message = f"no images ({' '.join(sorted(IMAGE_EXTS))}) in {folder}"
        if prompts.is_file():
            message += " (its prompts.txt is empty)"
        raise FileNotFoundError(message)
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
    """One image file as the network's input: a (3, 299, 299) float32 tensor in [-1, 1], preprocessed in FID
    mode `resize` (see FID_MODES), after an optional center crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")  # grayscale, palette, CMYK -> RGB; RGBA drops alpha, as pytorch-fid does
    if crop:
        img = center_crop(img, crop)
    x = np.asarray(img, dtype=np.float32)  # (H, W, 3) in [0, 255]
    if resize == "clean":
        # clean-fid: antialiased PIL bicubic on each channel in float ("F" images), so no uint8 rounding.
        chans = []
        for c in range(3):
            chan = Image.fromarray(np.ascontiguousarray(x[..., c]))  # (H, W) float32, PIL mode "F"
            chans.append(np.asarray(chan.resize((RES, RES), Image.Resampling.BICUBIC)))
        x = np.stack(chans).clip(0, 255)  # (3, 299, 299)
        return torch.from_numpy((x - 128) / 128)  # clean-fid's scaling, not 2x/255 - 1
    if resize != "bilinear":
        raise ValueError(f"resize must be 'bilinear' (pytorch-fid) or 'clean' (clean-fid), got {resize!r}")
    x = torch.from_numpy(x / 255).permute(2, 0, 1)  # (3, H, W)
    if x.shape[-2:] != (RES, RES):  # what pytorch-fid's model does to each batch
        x = F.interpolate(x[None], size=(RES, RES), mode="bilinear", align_corners=False)[0]
    return 2 * x - 1  # pytorch-fid's normalize_input


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> load(file), decoded in the DataLoader workers; a file that cannot be read gives the
    message that names it instead (see image_batches)."""

    def __init__(self, files, load):
        self.files = files
        self.load = load

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.load(self.files[i])
        except Exception as e:  # whatever PIL raises on a damaged file: OSError, SyntaxError, ValueError, ...
            return f"{self.files[i]}: cannot read image ({type(e).__name__}: {' '.join(str(e).split())})"


def collate(items):
    """A batch (B, ...) of tensors, or the message of its first unreadable file."""
    errors = [x for x in items if isinstance(x, str)]
    return errors[0] if errors else torch.stack(items)


def image_batches(files, load, batch_size=50, workers=0, device="cpu"):
    """Batches of load(file), decoded in `workers` processes. An unreadable file is a ValueError naming it:
    the message comes back as data, as an exception raised in a worker reaches the user as a traceback."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, load), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate, pin_memory=str(device).startswith("cuda"))
    for batch in loader:
        if isinstance(batch, str):
            raise ValueError(batch)
        yield batch


# -----------------------------------------------------------------------------
# Feature statistics and the Frechet distance


class RunningStats:
    """Mean and covariance of feature rows, accumulated batch by batch in float64 without keeping the rows."""

    def __init__(self, dim):
        self.n = 0  # rows seen
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))  # the sum of the centred outer products

    def update(self, x):  # x (B, dim)
        x = np.asarray(x, dtype=np.float64)
        b = len(x)
        mean_b = x.mean(0)
        xc = x - mean_b
        delta = mean_b - self.mean
        n = self.n + b
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
    """(mu, sigma) of the features net(x) of the images of `folder` (list_images), streamed batch by batch."""
    files = list_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder}: FID needs at least 2 images to estimate a covariance, "
                         f"found {len(files)}")
    if len(files) < 2048:
        print(f"warning: {folder}: only {len(files)} images; with fewer than 2048 the feature covariance is "
              f"singular and FID is biased high (the COCO protocol uses 30K)", file=sys.stderr)
    load = functools.partial(load_image, resize=resize, crop=crop)
    stats = None
    with torch.inference_mode(), tqdm(total=len(files), unit="img", desc=f"FID features {folder}",
                                      disable=not progress) as bar:
        for x in image_batches(files, load, batch_size, workers, device):  # (B, 3, 299, 299)
            f = net(x.to(device)).double().cpu().numpy()  # (B, 2048)
            if stats is None:
                stats = RunningStats(f.shape[1])
            stats.update(f)
            bar.update(len(x))
    return stats.stats()


def save_stats(path, mu, sigma, mode="bilinear"):
    """Write mu, sigma and the FID mode to an .npz (pytorch-fid's format, plus `mode`), atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"statistics file must end in .npz: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file object, so numpy does not append its own .npz
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, mode=np.array(mode))


def load_stats(path):
    """(mu, sigma, mode), mu and sigma in float64, from an .npz written by save_stats or by pytorch-fid (which
    has no `mode`: its own, "bilinear")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such statistics file")
    try:
        f = np.load(path)  # allow_pickle=False: arrays only
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {sorted(f.keys())}")
        mode = str(f["mode"]) if "mode" in f else "bilinear"
        if mode not in FID_MODES:
            raise ValueError(f"{path}: unknown FID mode {mode!r}, expected one of {FID_MODES}")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64), mode


def check_modes(a, mode_a, b, mode_b):
    """Refuse to compare statistics made in two FID modes: the distance would mix two preprocessings."""
    if mode_a != mode_b:
        raise UsageError(f"{a} is in FID mode {mode_a!r} and {b} in mode {mode_b!r}: FIDs of different modes "
                         f"are not comparable; make both with the same --resize")


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
# CLIP score (Hessel et al. 2021): how well images match their captions, as torchmetrics' CLIPScore


def pair_scores(image_emb, text_emb):
    """Per-pair CLIP scores 100 max(cos(E_image, E_caption), 0): (B, E) and (B, E) -> (B,) in float64."""
    # As Hessel et al. 2021 and torchmetrics' documentation define it; torchmetrics' code clips the mean
    # cosine at 0 instead of each pair's, which differs only where a pair's cosine is negative. Captions over
    # 77 tokens are cut keeping the end token (CLIPTokenizer), where torchmetrics slices it off; no COCO
    # caption is that long.
    cos = (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)
    return 100 * cos.clamp(min=0)


def load_clip_image(path, image_cfg):
    """One image file as CLIP's input (3, S, S): encoders.clip_preprocess with the checkpoint's settings."""
    with Image.open(path) as img:
        return clip_preprocess(img, **image_cfg)


def images_and_captions(folder, captions=None):
    """(image files, captions) of a folder: the caption of image i is line i of `captions` or of
    FOLDER/prompts.txt."""
    files = list_images(folder)
    path = Path(captions or Path(folder) / "prompts.txt")
    if not path.is_file() and captions:
        raise FileNotFoundError(f"{path}: no such captions file")
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no prompts.txt; give --captions FILE, line i for the i-th image")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # split as sample.py splits its prompts
    if len(lines) != len(files):
        raise ValueError(f"{path}: {len(lines)} captions for the {len(files)} images of {folder}")
    return files, lines


def clip_score(files, captions, clip, batch_size=50, device="cpu", workers=0, progress=True):
    """The mean CLIP score of image files and their captions (image i with caption i), in float64."""
    total = 0.0  # the sum of the scores so far
    n = 0  # images scored so far
    load = functools.partial(load_clip_image, image_cfg=clip.image_cfg)
    bar = tqdm(total=len(files), unit="img", desc="CLIP score", disable=not progress)
    with torch.inference_mode(), bar:
        for x in image_batches(files, load, batch_size, workers, device):  # (B, 3, S, S)
            image_emb = clip.encode_image(x.to(device))
            text_emb = clip.encode_text(captions[n:n + len(x)])
            total += pair_scores(image_emb, text_emb).sum().item()
            n += len(x)
            bar.update(len(x))
    return total / n


# -----------------------------------------------------------------------------
# The zero-shot COCO protocol: 30K captions of COCO 2014 val -> one sample each
# -> FID against val2014


def coco_captions(annotations, num=30000, seed=0):
    """`num` captions drawn at random without replacement from a COCO captions_*.json,
    one per line-safe string."""
    with open(annotations) as f:
        anns = json.load(f)["annotations"]
    if num > len(anns):
        raise UsageError(f"{annotations}: asked for {num} captions, the file has {len(anns)}")
    # a fixed order first, so that a seed always picks the same captions
    anns = sorted(anns, key=lambda a: a["id"])
    # whitespace collapsed: no stray newlines
    return [" ".join(a["caption"].split()) for a in random.Random(seed).sample(anns, num)]


# -----------------------------------------------------------------------------
# Command lines: FID (the main command) and its subcommands. Every flag shows its default in --help.

HELP = argparse.ArgumentDefaultsHelpFormatter


def add_common_args(p, fid=True):
    """The flags of every command that reads images; with fid, those of the Inception network and the mode."""
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    if fid:
        p.add_argument("--resize", choices=FID_MODES, default="bilinear",
                       help="FID mode: 'bilinear' as pytorch-fid, 'clean' as clean-fid's clean mode")
        p.add_argument("--center-crop", type=int, metavar="SIZE",
                       help="first crop folder images to their central square and resize to SIZE (COCO: 256)")
        p.add_argument("--weights", help=f"Inception weights: local .pth/.safetensors or URL; None: the "
                                         f"release, cached in {CACHE_DIR}; with --weights-repo, a file name")
        p.add_argument("--weights-repo", help="Hugging Face Hub repo holding the Inception weights file")


def write_result(path, result, argv):
    """Write a result JSON (atomically) with the command that made it."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**result, "command": shlex.join(["python", "fid.py", *argv])})
        print(f"wrote {path}")


class FullHelp(argparse.Action):
    """-h/--help of `fid.py`: its own help, then each subcommand's, so that one --help lists every flag."""

    def __init__(self, option_strings, dest, help=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        for name, (make_parser, _) in SUBCOMMANDS.items():
            print(f"\n=== fid.py {name} ===\n{make_parser().format_help()}", end="")
        parser.exit()


def fid_parser():
    p = argparse.ArgumentParser(prog="fid.py", formatter_class=HELP, add_help=False, description=(
        "FID between two image folders or .npz statistics (pytorch-fid's; clean-fid's with --resize clean). "
        "Subcommands, each listed below: coco-captions, clip-score, protocol."))
    p.add_argument("-h", "--help", action=FullHelp, help="show this help and every subcommand's, then exit")
    p.add_argument("paths", nargs="+", metavar="PATH", help="folder of images or .npz with mu and sigma")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of the first PATH")
    p.add_argument("--out", metavar="RESULT.json", help="also write the FID as JSON")
    add_common_args(p)
    return p


def fid_main(argv):
    """CLI: python fid.py A B  |  python fid.py A --save-stats OUT.npz  (A, B: image folders or .npz)"""
    p = fid_parser()
    args = p.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.save_stats):
        p.error("give two PATHs to compare, or one PATH with --save-stats")
    for path in args.paths:  # before any weights are fetched
        if not (path.endswith(".npz") and Path(path).is_file()) and not Path(path).is_dir():
            p.error(f"{path} is neither a folder of images nor an existing .npz statistics file")
        if Path(path).is_dir() and len(list_images(path)) < 2:
            p.error(f"{path}: FID needs at least 2 images to estimate a covariance")
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs would shift FID; the reference numbers are float32
    loaded = {path: load_stats(path) for path in args.paths if path.endswith(".npz")}
    modes = [loaded[path][2] if path in loaded else args.resize for path in args.paths]  # folders: --resize
    if len(modes) == 2:
        check_modes(args.paths[0], modes[0], args.paths[1], modes[1])
    net = None  # loaded once, and only if a PATH is a folder
    stats = []
    for path in args.paths:
        if path in loaded:
            stats.append(loaded[path][:2])
            continue
        if net is None:  # only folders need the network
            net = load_inception(args.weights, args.weights_repo, device=args.device)
        stats.append(compute_stats(path, net, args.batch_size, args.device, args.workers, args.resize,
                                   args.center_crop))
    if args.save_stats:
        save_stats(args.save_stats, *stats[0], modes[0])
        print(f"saved statistics of {args.paths[0]} ({modes[0]} mode) to {args.save_stats}")
    if len(stats) == 2:
        value = frechet_distance(*stats[0], *stats[1])
        print(f"FID: {value:.6f}")
        write_result(args.out, {"fid": value, "fid_mode": modes[0], "paths": args.paths,
                                "center_crop": args.center_crop}, argv)


def coco_captions_parser():
    p = argparse.ArgumentParser(prog="fid.py coco-captions", formatter_class=HELP,
                                description="Captions file for zero-shot COCO FID.")
    p.add_argument("annotations", help="COCO captions_val2014.json")
    p.add_argument("--out", required=True, help="text file, one caption per line (input of sample.py)")
    p.add_argument("--num", type=int, default=30000, help="number of captions (the protocol's 30K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    return p


def coco_captions_main(argv):
    """CLI: python fid.py coco-captions captions_val2014.json --out coco30k.txt [--num 30000 --seed 0]"""
    args = coco_captions_parser().parse_args(argv)
    captions = coco_captions(args.annotations, args.num, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        Path(tmp).write_text("\n".join(captions) + "\n")
    print(f"wrote {len(captions)} captions to {args.out}")


def clip_score_parser():
    p = argparse.ArgumentParser(prog="fid.py clip-score", formatter_class=HELP,
                                description="CLIP score of images against their captions: 100 max(cos, 0) of "
                                            "their CLIP embeddings, averaged (torchmetrics' CLIPScore).")
    p.add_argument("folder", metavar="FOLDER",
                   help="images: a sample folder's 000000.png ... (see prompts.txt), else every image in it")
    p.add_argument("--captions", metavar="FILE",
                   help="caption of image i on line i; None: FOLDER/prompts.txt")
    p.add_argument("--weights", default=OPENAI_CLIP_L, metavar="REPO_OR_DIR",
                   help="CLIP: a Hub repo or folder, HF CLIPModel or open_clip layout")
    p.add_argument("--out", metavar="RESULT.json", help="also write the score as JSON")
    add_common_args(p, fid=False)
    return p


def clip_score_main(argv):
    """CLI: python fid.py clip-score FOLDER [--captions FILE] [--weights REPO_OR_DIR] [--out RESULT.json]"""
    args = clip_score_parser().parse_args(argv)
    files, captions = images_and_captions(args.folder, args.captions)
    check_hub(args.weights, "--weights DIR")
    clip = load_clip(args.weights, device=args.device)
    score = clip_score(files, captions, clip, args.batch_size, args.device, args.workers)
    print(f"CLIP score: {score:.4f} ({len(files)} images, {args.weights})")
    write_result(args.out, {"clip_score": score, "num_images": len(files), "images": args.folder,
                            "captions": args.captions or str(Path(args.folder) / "prompts.txt"),
                            "clip_weights": args.weights}, ["clip-score", *argv])


def protocol_parser():
    p = argparse.ArgumentParser(prog="fid.py protocol", formatter_class=HELP,
                                description="The COCO protocol's last step: FID of a sample folder against "
                                            "reference statistics, and the CLIP score of its images against "
                                            "its prompts.txt, in one JSON.")
    p.add_argument("samples", metavar="SAMPLES_DIR", help="sample.py's output: 000000.png ..., prompts.txt, "
                                                          "sample.json")
    p.add_argument("ref_stats", metavar="REF_STATS.npz", help="reference statistics, made once: "
                   "python fid.py val2014/ --center-crop 256 --save-stats ref.npz")
    p.add_argument("--clip-weights", default=OPENAI_CLIP_L, metavar="REPO_OR_DIR",
                   help="CLIP: a Hub repo or folder, HF CLIPModel or open_clip layout")
    p.add_argument("--out", metavar="RESULT.json", help="the result; None: SAMPLES_DIR_protocol.json, beside "
                                                         "the folder (as sample.py's SAMPLES_DIR_grid.png)")
    add_common_args(p)
    return p


def protocol_main(argv):
    """CLI: python fid.py protocol SAMPLES_DIR REF_STATS.npz [--clip-weights REPO_OR_DIR] [--out OUT.json]"""
    args = protocol_parser().parse_args(argv)
    mu_ref, sigma_ref, mode = load_stats(args.ref_stats)
    check_modes(args.samples, args.resize, args.ref_stats, mode)  # before any network is loaded
    files, captions = images_and_captions(args.samples)
    check_hub(args.clip_weights, "--clip-weights DIR")  # before the FID features are computed
    torch.backends.cudnn.allow_tf32 = False
    net = load_inception(args.weights, args.weights_repo, device=args.device)
    mu, sigma = compute_stats(args.samples, net, args.batch_size, args.device, args.workers, args.resize,
                              args.center_crop)
    del net  # the device's memory, for CLIP
    fid_value = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    clip = load_clip(args.clip_weights, device=args.device)
    score = clip_score(files, captions, clip, args.batch_size, args.device, args.workers)
    manifest = Path(args.samples) / "sample.json"  # written by sample.py: ckpt, seed, steps, ..., command
    meta = {}
    if manifest.is_file():
        meta = read_json(manifest)
    print(f"FID: {fid_value:.4f}  CLIP score: {score:.4f}  ({len(files)} images, FID mode {args.resize})")
    write_result(args.out or f"{Path(args.samples)}_protocol.json", {
        "fid": fid_value, "clip_score": score, "num_images": len(files), "fid_mode": args.resize,
        "center_crop": args.center_crop, "samples": args.samples, "reference_stats": args.ref_stats,
        "checkpoint": meta.get("ckpt"), "sampling_command": meta.get("command"), "sample": meta or None,
        "clip_weights": args.clip_weights, "inception_weights": args.weights or FID_WEIGHTS_URL,
        "inception_weights_repo": args.weights_repo}, ["protocol", *argv])


SUBCOMMANDS = {"coco-captions": (coco_captions_parser, coco_captions_main),  # name: (parser, main)
               "clip-score": (clip_score_parser, clip_score_main),
               "protocol": (protocol_parser, protocol_main)}


def main(argv=None):
    """CLI: python fid.py [coco-captions | clip-score | protocol] ARGS; without a subcommand, FID."""
    if argv is None:
        argv = sys.argv[1:]
    argv = [str(a) for a in argv]  # paths may come as pathlib.Path from Python
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]][1](argv[1:])
    return fid_main(argv)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # one line, no traceback
        # exit 2: the command must change (a bad value, an input that is not there); 1: the job failed
        print(f"fid.py: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, (UsageError, FileNotFoundError)) else 1)
