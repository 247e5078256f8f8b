"""Data: the built-in shapes dataset and its scorer, the frozen text encoders and VAE, latent shards (local or
streamed from the Hugging Face Hub), and `python data.py prepare` to encode real image-caption pairs."""
import argparse
import collections
import csv
import functools
import gzip
import html
import itertools
import json
import math
import os
import re
import sys
import time
import unicodedata
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image, ImageDraw, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from scipy import ndimage
from tqdm import tqdm

SDXL_VAE = "stabilityai/stable-diffusion-xl-base-1.0"  # subfolder "vae"; 4 channels, scaling_factor 0.13025 (SPEC A5)
VAE_16CH = "ostris/vae-kl-f8-d16"  # files at the repo root; 16 channels, shift_factor null
DFN5B_CLIP = "apple/DFN5B-CLIP-ViT-H-14-378"  # open_clip format, text width 1024, 24 layers, quick_gelu true

# -----------------------------------------------------------------------------
# Built-in shapes dataset: scenes, captions, rendering.
# A scene is a tuple of one or two Obj. Everything is in fractions of the image side so that
# any resolution works; at the default 32px a small object is 7px and a large one 13px across.

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # RGB; saturated hues at least 31 degrees apart as directions, so blur and noise keep them apart
    "red": (235, 35, 35), "yellow": (235, 220, 35), "green": (35, 215, 35),
    "cyan": (35, 215, 235), "blue": (45, 45, 245), "purple": (215, 40, 230),
}
POSITIONS = {  # (x, y) of the object's bounding-box centre
    "left": (0.23, 0.5), "right": (0.77, 0.5), "top": (0.5, 0.23), "bottom": (0.5, 0.77), "center": (0.5, 0.5),
}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
SIZES = {"small": 0.22, "large": 0.42}  # side of the bounding box
GAP = 0.04  # two objects' bounding boxes are at least this far apart along x or y (1.3px at 32px)
SUPERSAMPLE = 4  # draw at 4x the resolution, then LANCZOS down, for clean anti-aliased edges
HELDOUT_EVERY = 8  # one two-object scene in 8 (by a hash of its caption) is never used for training


class Obj(NamedTuple):
    shape: str
    colour: str
    position: str
    size: str


def caption(scene):
    """Plain-English caption of a scene, e.g. 'a small red circle on the left and a large blue square at the top'."""
    return " and ".join(f"a {o.size} {o.colour} {o.shape} {PHRASES[o.position]}" for o in scene)


_OBJ_RE = re.compile(r"an? ({}) ({}) ({}) ({})".format(
    "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES), "|".join(PHRASES.values())))


def parse_caption(text):
    """Inverse of caption(): the scene a caption describes; ValueError if it is not in the grammar."""
    parts = text.strip().lower().rstrip(".").split(" and ")
    matches = [_OBJ_RE.fullmatch(p.strip()) for p in parts]
    if not 1 <= len(parts) <= 2 or not all(matches):
        raise ValueError(f"caption {text!r} is not of the form 'a <size> <colour> <shape> <where> [and ...]'")
    where = {v: k for k, v in PHRASES.items()}
    return tuple(Obj(m[3], m[2], where[m[4]], m[1]) for m in matches)


def _box(o):
    """Bounding box (x0, y0, x1, y1) of an object, in fractions of the image side."""
    (x, y), h = POSITIONS[o.position], SIZES[o.size] / 2
    return x - h, y - h, x + h, y + h


def _compatible(a, b):
    """Two objects may share an image: different colours, boxes apart by GAP along x or y (so other positions)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _box(a), _box(b)
    apart = max(bx0 - ax1, ax0 - bx1) >= GAP or max(by0 - ay1, ay0 - by1) >= GAP
    return a.colour != b.colour and apart


def sample_scene(rng):
    """One random scene (one or two objects, equally likely) from a numpy Generator."""
    pick = lambda names: names[rng.integers(len(names))]
    n = 1 + int(rng.random() < 0.5)
    while True:
        scene = tuple(Obj(pick(SHAPES), pick(list(COLOURS)), pick(list(POSITIONS)), pick(list(SIZES)))
                      for _ in range(n))
        if n == 1 or _compatible(*scene):
            return scene


def is_heldout(scene):
    """True for the fixed two-object scenes kept out of training: new combinations of seen objects."""
    return len(scene) == 2 and zlib.crc32(caption(sorted(scene)).encode()) % HELDOUT_EVERY == 0  # any order


def train_scene(seed, i):
    """Scene i of the training set: a pure function of (seed, i) that never returns a held-out scene."""
    rng = np.random.default_rng([seed, i])
    while is_heldout(scene := sample_scene(rng)):
        pass
    return scene


def heldout_captions(n=512, seed=0):
    """n captions of held-out scenes, which training data never contains; no scene repeats before all are used."""
    objs = [Obj(*o) for o in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES)]
    scenes = [s for s in itertools.combinations(objs, 2) if _compatible(*s) and is_heldout(s)]  # 526 of 4320
    rng = np.random.default_rng([seed, 2**32 - 1])  # a stream no training index (seed, i) uses
    order = np.concatenate([rng.permutation(len(scenes)) for _ in range(max(1, -(-n // len(scenes))))])[:n]
    return [caption(scenes[i][:: rng.choice([1, -1])]) for i in order]  # objects in either order


def render(scene, res=32):
    """Draw a scene on a black background: a (res, res) RGB PIL image."""
    s = res * SUPERSAMPLE
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    for o in scene:
        x0, y0, x1, y1 = (round(v * s) for v in _box(o))
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # isosceles triangle pointing up, as wide as it is tall
            draw.polygon(((x0 + x1 - 1) / 2, y0, x1 - 1, y1 - 1, x0, y1 - 1), fill=fill)
    # reducing_gap: Pillow box-reduces 4x -> 2x before the LANCZOS step, 2.4x faster and alike to the eye.
    return img.resize((res, res), Image.LANCZOS, reducing_gap=2.0)


def image_to_latent(img):
    """PIL image or uint8 (..., H, W, 3) -> float32 tensor (..., 3, H, W) in [-1, 1]; the shapes 'latents'."""
    return torch.from_numpy(np.array(img)).movedim(-1, -3).float() / 127.5 - 1  # a copy: PIL's arrays are read-only


def latent_to_image(x):
    """float tensor (N, 3, H, W) in [-1, 1] -> uint8 numpy (N, H, W, 3), ready for score()."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

# -----------------------------------------------------------------------------
# GenEval-style scorer: find the coloured blobs in an image, then check each caption object.
# Pixels are classified by the direction of their RGB vector, which anti-aliasing against the
# black background, blur and mild noise leave nearly unchanged; its length gives the coverage.


Blob = NamedTuple("Blob", [("colour", str), ("position", str), ("shape", str), ("area", float)])  # area in pixels


_PAL = np.array(list(COLOURS.values()), np.float32) / 255  # (K, 3)
_PAL_UNIT = _PAL / np.linalg.norm(_PAL, axis=1, keepdims=True)
_ANCHORS = np.array(list(POSITIONS.values()))  # (5, 2)


def find_blobs(image):
    """The coloured objects in one uint8 (H, W, 3) image, with their colour, position and shape."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"find_blobs: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    x, res = image.astype(np.float32) / 255, image.shape[0]  # (H, W, 3)
    proj = x @ _PAL_UNIT.T  # (H, W, K) length along each palette direction
    k = proj.argmax(-1)
    cos = proj.max(-1) / (np.linalg.norm(x, axis=-1) + 1e-6)
    alpha = np.clip(proj.max(-1) / np.linalg.norm(_PAL, axis=1)[k], 0, 1)  # coverage of the pixel by the object
    fg = (alpha > 0.3) & (cos > 0.9)  # cos(26 deg): greys and whites are background, not an object
    min_px = 0.3 * 0.5 * (SIZES["small"] * res) ** 2  # a third of the smallest object (a small triangle)
    max_px = 2.0 * (SIZES["large"] * res) ** 2  # twice the largest (a large square)
    blobs = []
    for c, name in enumerate(COLOURS):
        labels, n = ndimage.label(fg & (k == c), structure=np.ones((3, 3)))
        for j, sl in enumerate(ndimage.find_objects(labels)):
            ys, xs = np.nonzero(labels[sl] == j + 1)
            if not min_px <= len(ys) <= max_px:
                continue
            w = alpha[sl][ys, xs]  # (P,) coverage of the blob's pixels
            area, cy, cx = w.sum(), (ys * w).sum() / w.sum(), (xs * w).sum() / w.sum()
            u = np.stack([xs - cx, ys - cy])  # (2, P) offsets from the centroid
            u = np.concatenate([u, np.stack([u[0] + u[1], u[0] - u[1]]) / 2**0.5])  # (4, P) along x, y, diagonals
            m2, m3, m4 = ((w * u**p).sum(1) / area for p in (2, 3, 4))
            var = m2[:2].mean()
            if m2[:2].min() < 0.1 or area / var < 6:  # a solid shape has area/variance 10-13, noise far less
                continue
            # A triangle pointing up has its mass skewed down (skewness -0.57 along y). A square's profile
            # is uniform along an axis and triangular along a diagonal, fourth cumulants -1.2 and -0.6
            # var^2; a circle's is the same in every direction. Blur adds no third or fourth cumulant, so
            # both tests survive it, only shrinking as blur adds to the variance.
            k4 = m4 - 3 * m2**2
            skew, corners = m3[1] / m2[1] ** 1.5, (k4[:2].sum() - k4[2:].sum()) / 2 / var**2
            shape = "triangle" if skew < -0.15 else "square" if corners < -0.25 else "circle"
            where = (cx + sl[1].start + 0.5) / res, (cy + sl[0].start + 0.5) / res
            blobs.append(Blob(name, list(POSITIONS)[np.argmin(((_ANCHORS - where) ** 2).sum(1))], shape, float(area)))
    return blobs


def _agree(o, b):
    """How many of shape, colour and position a blob (or None) shares with a caption object."""
    return 0 if b is None else (o.shape == b.shape) + (o.colour == b.colour) + (o.position == b.position)


def score(images, captions):
    """Per-attribute accuracy of images against their captions: {'shape', 'colour', 'position', 'count', 'mean'}."""
    if len(images) != len(captions):
        raise ValueError(f"score: {len(images)} images but {len(captions)} captions")
    hits = {"shape": [], "colour": [], "position": [], "count": []}
    for img, text in zip(images, captions):
        scene = parse_caption(text)
        blobs = find_blobs(img.convert("RGB") if isinstance(img, Image.Image) else img)
        hits["count"].append(len(blobs) == len(scene))
        # Give each caption object its own blob (or none), agreeing on as many attributes as possible, then
        # the largest blobs; so a wrong colour costs the colour only, and a swap of colours between two
        # objects (wrong binding) shows up as wrong colours.
        blobs = sorted(blobs, key=lambda b: -b.area)[:8]
        key = lambda bs: (sum(_agree(o, b) for o, b in zip(scene, bs)), sum(b.area for b in bs if b is not None))
        matched = max(itertools.permutations(blobs + [None] * len(scene), len(scene)), key=key)
        for o, b in zip(scene, matched):
            for attr in ("shape", "colour", "position"):
                hits[attr].append(b is not None and getattr(b, attr) == getattr(o, attr))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["mean"] = (out["shape"] + out["colour"] + out["position"]) / 3  # the count is reported, not averaged
    return out

# -----------------------------------------------------------------------------
# Built-in text encoder: frozen, deterministic, nothing to download. Same interface as the CLIP
# text tower: enc(captions) -> (B, max_len, dim) token features, attributes .dim and .max_len.


class BuiltinTextEncoder:
    """Word tokens -> fixed random vectors seeded by crc32(word), plus a sinusoidal position code, plus a causal
    context: a decaying sum (factor `context` per word) of second vectors, seeded by crc32('ctx:' + word), of
    the words before. As in a causal CLIP text tower, 'left' in 'a red circle on the left' then carries 'red' and
    'circle'. Without it (context=0) each token knows only its word and place, and a small model rarely learns
    which colour goes with which object: MicroDiT_S at 1,000 steps scored colour 0.75 without, 0.98 with."""

    def __init__(self, dim=64, max_len=24, context=0.7):
        if dim < 2 or dim % 2:
            raise ValueError(f"BuiltinTextEncoder: dim must be even and >= 2, got {dim}")
        if not 0 <= context < 1:
            raise ValueError(f"BuiltinTextEncoder: context must be in [0, 1), got {context}")
        self.dim, self.max_len, self.context = dim, max_len, context
        self.name = f"builtin-crc32-{dim}" + (f"-ctx{context:g}" if context else "")
        self.spec = {"type": "builtin", "dim": dim, "max_len": max_len, "context": context}
        pos, freq = torch.arange(max_len)[:, None], 10000 ** (-torch.arange(0, dim, 2) / dim)
        self.pos = torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], -1).reshape(max_len, dim)
        self._vectors = {}
        self.pad = self._vector("<pad>")  # '<' and ':' cannot occur in a word token, so no word shares these

    def _vector(self, word):
        if word not in self._vectors:  # RandomState's stream is frozen across numpy versions; crc32 across runs
            rs = np.random.RandomState(zlib.crc32(word.encode()))
            self._vectors[word] = torch.from_numpy(rs.standard_normal(self.dim).astype(np.float32))
        return self._vectors[word]

    def __call__(self, captions):
        if isinstance(captions, str):
            raise TypeError("text encoder: pass a list of captions, not one string")
        out = self.pad.repeat(len(captions), self.max_len, 1)  # (B, L, D)
        for b, text in enumerate(captions):
            words = re.findall(r"[a-z0-9]+", text.lower())[: self.max_len] if isinstance(text, str) else []
            if not words:
                raise ValueError(f"text encoder: caption {b} has no words: {text!r}")
            out[b, : len(words)] = torch.stack([self._vector(w) for w in words]) + self.pos[: len(words)]
            if self.context:
                ctx = torch.zeros(self.dim)  # (D,) what the words before this one said
                for i, w in enumerate(words):
                    out[b, i] += ctx
                    ctx = self.context * ctx + self._vector("ctx:" + w)
        return out

# -----------------------------------------------------------------------------
# Files: a local folder or a Hugging Face Hub repo. hf_hub_download fetches a file once into the HF cache
# (HF_HUB_CACHE) and returns its local path; with HF_HUB_OFFLINE=1 it reads the cache only. Model repos are
# named "USER/NAME" (or a local folder); dataset repos "hf://datasets/USER/NAME[@REVISION][/SUBDIR]".

HUB_DATASETS = "hf://datasets/"


def parse_hub_root(root):
    """'hf://datasets/USER/NAME[@REVISION][/SUBDIR]' -> (repo_id, revision or None, subdir or None)."""
    parts = root[len(HUB_DATASETS):].strip("/").split("/") if root.startswith(HUB_DATASETS) else []
    if len(parts) < 2 or not parts[0] or not parts[1].partition("@")[0]:
        raise ValueError(f"{root!r}: expected a local folder or hf://datasets/USER/NAME[@REVISION][/SUBDIR]")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]) or None


def _fetch(repo, filename, subfolder=None, repo_type="model", revision=None):
    """Local path of `filename` in a local folder or Hub repo, or None if the repo has no such file."""
    if repo_type == "model" and os.path.isdir(repo):
        path = os.path.join(repo, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    try:
        return hf_hub_download(repo, filename, subfolder=subfolder or None, repo_type=repo_type, revision=revision)
    except EntryNotFoundError:  # also what an offline cache miss raises (LocalEntryNotFoundError)
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        what = "local folder or Hub repo" if repo_type == "model" else "Hub dataset repo or revision"
        raise FileNotFoundError(f"{repo}: no such {what} ({type(e).__name__}){_hint()}") from None


def _hint():
    if hf_constants.HF_HUB_OFFLINE:
        return f" [HF_HUB_OFFLINE is set: only files already in the HF cache ({hf_constants.HF_HUB_CACHE}) can be used]"
    return " [or the Hub could not be reached]"


def _find(repo, names, folders):
    """(path, name, folder) of the first of `names` present in the first folder that has one."""
    for folder in folders:
        for name in names:
            if path := _fetch(repo, name, folder):
                return path, name, folder
    where = ", ".join(repr(f or "<root>") for f in folders)
    raise FileNotFoundError(f"{repo}: none of {names} found in {where}{_hint() if not os.path.isdir(repo) else ''}")


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _load_weights(path, skip=()):
    """{name: tensor} from .safetensors or a tensors-only .bin (torch.load weights_only), minus `skip` prefixes."""
    if path.endswith(".safetensors"):
        with safe_open(path, "pt") as f:  # read only the tensors we keep (open_clip files carry the vision tower too)
            return {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = sd.get("state_dict", sd)
    return {k: v for k, v in sd.items() if not k.startswith(skip)}


def _load_into(model, sd, where):
    """Load `sd` into a meta-device model after checking every name and shape; errors name the offending keys."""
    want = model.state_dict()
    missing, unexpected = sorted(want.keys() - sd.keys()), sorted(sd.keys() - want.keys())
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
              for k, v in want.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: weights do not fit the model: missing {_few(missing)}, "
                         f"unexpected {_few(unexpected)}, wrong shape {_few(shapes)}")
    model.load_state_dict(sd, assign=True)


def _few(names, n=6):
    return f"{len(names)} {names[:n]}{' ...' if len(names) > n else ''}"


def _frozen(model, device, dtype):
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _spec_repo(repo):
    """How a spec names a repo: a local folder by its absolute path (so it works from any directory), else the id."""
    return os.path.abspath(repo) if os.path.isdir(repo) else repo

# -----------------------------------------------------------------------------
# CLIP BPE tokenizer (byte-level BPE over the 49,408-entry CLIP vocabulary), without ftfy or the `regex` module


def _ftfy_lite():
    """str.translate table for the fixes of ftfy.fix_text that change valid-UTF-8 text (ftfy is not a runtime dep)."""
    # Kept: invisible control characters deleted, C1 controls read as the cp1252 characters they usually are,
    # full/half-width forms, the ideographic space and Latin ligatures to normal letters, curly quotes straightened.
    # Not repeated: mojibake repair (text decoded with the wrong codec, e.g. "cafÃ©") and rarer heuristics.
    quotes = {**dict.fromkeys(map(ord, "\u02bc\u2018\u2019\u201a\u201b"), "'"),
              **dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')}
    table = dict.fromkeys([*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                           *range(0xFFF9, 0xFFFD)])  # deleted
    table |= {i: bytes([i]).decode("cp1252") for i in range(0x80, 0xA0) if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}
    wide_and_ligatures = [*range(0xFF01, 0xFFF0), *range(0xFB00, 0xFB07), 0x132, 0x133, 0x149, *range(0x1C4, 0x1CD),
                          *range(0x1F1, 0x1F4)]
    table |= {i: unicodedata.normalize("NFKC", chr(i)) for i in wide_and_ligatures}
    table |= {0x3000: " ", 0xFB05: "\u017ft"} | quotes  # ftfy spells the long-s-t ligature with a long s
    return {k: v and v.translate(quotes) for k, v in table.items()}  # one pass: quotes produced above straightened too


_FTFY_LITE = _ftfy_lite()


def clean_caption(text):
    """CLIP's text cleaning: HTML unescape (twice), ftfy-lite + NFC, whitespace runs to one space, lower case."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)).translate(_FTFY_LITE))
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=None)
def _byte_to_unicode():
    """The GPT-2/CLIP table mapping each byte to a printable character, so BPE never sees spaces or control bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # the rest are shifted to code points 256, 257, ...
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@functools.lru_cache(maxsize=1)
def _split_regex():
    """CLIP's pre-tokenizer  's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+  written for the `re` module."""
    # In `re`, [^\W\d_] is "a letter or a non-decimal number": the ~1,100 non-decimal numbers (categories Nl/No, e.g.
    # ², ½, Ⅻ, ①) are listed explicitly so that letter runs stop at them and they count as single numbers, as \p{N}.
    numbers = [ord(c) for c in filter(str.isnumeric, map(chr, range(sys.maxunicode + 1)))
               if not c.isalpha() and not c.isdecimal()]
    runs = []
    for cp in numbers:
        if runs and runs[-1][1] == cp - 1:
            runs[-1][1] = cp
        else:
            runs.append([cp, cp])
    nlno = "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs)
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|(?:(?![{nlno}])[^\W\d_])+|[\d{nlno}]|(?:[^\w\s]|_)+")


class CLIPTokenizer:
    """Captions -> (B, max_len) int64 ids: [start] + BPE(caption)[:max_len-2] + [end] + padding."""

    def __init__(self, vocab, merges, pad=0, max_len=77):
        self.vocab, self.ranks, self.max_len = vocab, {m: i for i, m in enumerate(merges)}, max_len
        self.sot, self.eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]  # 49406, 49407 in the real vocabulary
        self.pad_id = vocab[pad] if isinstance(pad, str) else pad  # open_clip pads with 0, HF with its pad_token
        self.byte_encoder = _byte_to_unicode()
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge)

    @classmethod
    def from_hf_files(cls, vocab_json, merges_txt, pad="<|endoftext|>", max_len=77):
        """From a Hugging Face vocab.json + merges.txt (the first line of merges.txt is a '#version' header)."""
        with open(merges_txt, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#version")]
        return cls(_read_json(vocab_json), merges, pad, max_len)

    @classmethod
    def from_bpe_file(cls, path, pad=0, max_len=77):
        """From open_clip's / OpenAI's bpe_simple_vocab_16e6.txt.gz: the vocabulary is rebuilt from the merges."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]  # 48,894 merges
        units = list(_byte_to_unicode().values())
        tokens = [*units, *(u + "</w>" for u in units), *("".join(m) for m in merges)]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad, max_len)

    def _merge(self, word):
        """Byte-level BPE of one pre-token: repeatedly merge the adjacent pair with the lowest merge rank."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]  # "</w>" marks the end of a word
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text):
        """One caption -> BPE ids, without start/end tokens. Special-token strings in the text are plain text."""
        ids = []
        for word in _split_regex().findall(clean_caption(text)):
            ids.extend(self.vocab[p] for p in self._bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, captions):
        out = torch.full((len(captions), self.max_len), self.pad_id, dtype=torch.long)
        for i, text in enumerate(captions):  # over-long captions are cut, keeping the end token (as open_clip and HF)
            ids = [self.sot] + self.encode(text)[: self.max_len - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

# -----------------------------------------------------------------------------
# CLIP text transformer, in open_clip's key layout; HF CLIPTextModel checkpoints are renamed to it on load


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with (and DFN5B, whose config says so)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with open_clip's fused in_proj (q, k, v stacked along dim 0)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T, head_dim) each
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token t sees tokens <= t, as CLIP was trained
        return self.out_proj(x.transpose(1, 2).reshape(B, T, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_width, act, eps):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width, eps=eps), CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=QuickGELU() if act == "quick_gelu"
                                             else nn.GELU(), c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTextTransformer(nn.Module):
    """Token ids (B, T) -> token features (B, T, width) after ln_final; no pooling, no text_projection (SPEC A5)."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, heads=8, layers=12, mlp_width=2048,
                 act="gelu", eps=1e-5):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP text activation {act!r} (expected 'gelu' or 'quick_gelu')")
        # uninitialised like the other tensors, as its weights are always loaded (normal_ on the meta device takes 1s)
        self.token_embedding = nn.Embedding.from_pretrained(torch.empty(vocab_size, width), freeze=False)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_width, act, eps) for _ in range(layers)])})
        self.ln_final = nn.LayerNorm(width, eps=eps)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, T, D)
        for block in self.transformer["resblocks"]:
            x = block(x)
        return self.ln_final(x)


class TextEncoder(nn.Module):
    """The frozen text encoder interface: enc(captions: list[str]) -> (B, max_len, dim) float features."""

    def __init__(self, model, tokenizer, name="clip"):
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name  # name: where the weights came from
        self.dim, self.max_len = model.ln_final.weight.shape[0], tokenizer.max_len

    def forward(self, captions):
        if isinstance(captions, str):
            raise TypeError("TextEncoder takes a list of captions, not a single string")
        return self.model(self.tokenizer(captions).to(self.model.positional_embedding.device))


_HF_TO_OPEN_CLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"), ("final_layer_norm", "ln_final"),
                    ("embeddings.position_embedding.weight", "positional_embedding"), ("layer_norm1", "ln_1"),
                    ("encoder.layers.", "transformer.resblocks."), ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
# Keys a checkpoint may carry that the token features do not use: the image tower, the CLIP-space projections
# (the features are taken before text_projection), the temperature, and buffers older checkpoints saved.
_UNUSED = ("visual.", "vision_model.", "visual_projection", "text_projection", "logit_scale", "logit_bias",
           "embeddings.position_ids", "attn_mask")


def hf_to_open_clip(sd):
    """Rename an HF CLIPTextModel state dict to open_clip's layout, fusing q/k/v into in_proj_{weight,bias}."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # the prefix of checkpoints before transformers 5
    for k in [k for k in sd if ".self_attn.q_proj." in k]:
        names = [k.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        if all(n in sd for n in names):  # otherwise they stay as they are, and the key check names them
            sd[k.replace("self_attn.q_proj.", "attn.in_proj_")] = torch.cat([sd.pop(n) for n in names])
    out = {}
    for k, v in sd.items():
        if not re.search(r"self_attn\.[qkv]_proj", k):  # unfused leftovers keep their names for the error message
            for a, b in _HF_TO_OPEN_CLIP:
                k = k.replace(a, b)
        out[k] = v
    return out


def load_text_encoder(repo_or_path=DFN5B_CLIP, subfolder=None, device="cpu", dtype=torch.float32):
    """A frozen CLIP text tower + tokenizer from an open_clip or HF CLIPTextModel folder (format detected)."""
    cfg_path, cfg_name, folder = _find(repo_or_path, ["open_clip_config.json", "config.json"], [subfolder])
    cfg = _read_json(cfg_path)
    if cfg_name == "open_clip_config.json":  # open_clip: DFN5B, LAION ViT-H/14
        family, model_cfg = "open_clip", cfg.get("model_cfg", cfg)
        t = model_cfg.get("text_cfg", {})
        odd = [k for k in ("hf_model_name", "ls_init_value", "no_causal_mask", "embed_cls", "act_kwargs") if t.get(k)]
        if odd:
            raise ValueError(f"{cfg_path}: text_cfg options {odd} are not supported (only the built-in text tower)")
        width = t.get("width", 512)
        arch = dict(vocab_size=t.get("vocab_size", 49408), context_length=t.get("context_length", 77), width=width,
                    heads=t.get("heads", 8), layers=t.get("layers", 12), mlp_width=int(width * t.get("mlp_ratio", 4.0)),
                    act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", eps=1e-5)
        weight_names, convert = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], lambda sd: sd
    else:  # HF: CLIPTextModel(WithProjection) config, or a full CLIPModel config with the text tower nested
        family, t = "hf", cfg.get("text_config", cfg)
        if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not a CLIP text model")
        arch = dict(vocab_size=t.get("vocab_size", 49408), context_length=t.get("max_position_embeddings", 77),
                    width=t.get("hidden_size", 512), heads=t.get("num_attention_heads", 8),
                    layers=t.get("num_hidden_layers", 12), mlp_width=t.get("intermediate_size", 2048),
                    act=t.get("hidden_act", "quick_gelu"), eps=t.get("layer_norm_eps", 1e-5))
        weight_names, convert = ["model.safetensors", "pytorch_model.bin"], hf_to_open_clip
    weights, _, _ = _find(repo_or_path, weight_names, [folder])
    with torch.device("meta"):
        model = CLIPTextTransformer(**arch)
    # open_clip models with custom_text=true keep the text tower under "text."
    sd = {k.removeprefix("text."): v for k, v in convert(_load_weights(weights, skip=_UNUSED)).items()}
    _load_into(model, {k: v for k, v in sd.items() if not k.startswith(_UNUSED)}, cfg_path)
    tokenizer = load_tokenizer(repo_or_path, subfolder, family, arch["context_length"])
    enc = TextEncoder(model, tokenizer, name=f"{repo_or_path}/{folder or ''}".rstrip("/"))
    enc.spec = {"type": "clip", "repo": _spec_repo(repo_or_path), "subfolder": subfolder, "dim": enc.dim,
                "max_len": enc.max_len}
    return _frozen(enc, device, dtype)


def load_tokenizer(repo_or_path, subfolder=None, family="open_clip", max_len=77):
    """The CLIP tokenizer from a repo's vocab.json + merges.txt (or open_clip's bpe .txt.gz) beside the weights."""
    # e.g. SDXL: text_encoder_2/ -> tokenizer_2/; DFN5B: the repo root
    folders = [subfolder, subfolder.replace("text_encoder", "tokenizer")] if subfolder else []
    folders = list(dict.fromkeys([*folders, "tokenizer", None]))
    path, name, folder = _find(repo_or_path, ["vocab.json", "bpe_simple_vocab_16e6.txt.gz"], folders)
    if name.endswith(".gz"):
        return CLIPTokenizer.from_bpe_file(path, pad=0, max_len=max_len)
    pad = 0  # open_clip pads with id 0 whatever the repo's HF tokenizer files say (SPEC A5)
    if family == "hf":  # HF pads with its pad_token: "<|endoftext|>" for OpenAI CLIP-L, "!" (id 0) for LAION/SDXL's 2nd
        tok_cfg = (_fetch(repo_or_path, "tokenizer_config.json", folder)
                   or _fetch(repo_or_path, "special_tokens_map.json", folder))
        pad = (_read_json(tok_cfg).get("pad_token") if tok_cfg else None) or "<|endoftext|>"
        pad = pad["content"] if isinstance(pad, dict) else pad
    merges, _, _ = _find(repo_or_path, ["merges.txt"], [folder])
    return CLIPTokenizer.from_hf_files(path, merges, pad, max_len)

# -----------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL (the LDM "KL-f8" autoencoder), same module tree so the state dict keys match

VAE_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1, act_fn="silu",
                    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                    latents_mean=None, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (1x1-projected when the width changes)."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions (one per mid block), with a residual."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers keeps a (dropped-out) Dropout at to_out.1

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None]  # (B, 1, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    """ResnetBlock -> self-attention -> ResnetBlock at the lowest resolution."""

    def __init__(self, ch, groups, attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups)] if attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Block(nn.Module):
    """n ResnetBlocks, then an optional 2x resampling conv (diffusers DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, cin, cout, n, groups, resample=None):  # resample: None, "down" or "up"
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.resample = resample
        if resample:  # keys: down_blocks.i.downsamplers.0.conv.* / up_blocks.i.upsamplers.0.conv.*
            down = resample == "down"
            conv = nn.Conv2d(cout, cout, 3, stride=2 if down else 1, padding=0 if down else 1)
            setattr(self, resample + "samplers", nn.ModuleList([nn.ModuleDict({"conv": conv})]))

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":  # LDM pads right/bottom only, so a stride-2 3x3 conv halves H and W exactly
            x = self.downsamplers[0]["conv"](F.pad(x, (0, 1, 0, 1)))
        elif self.resample == "up":
            x = self.upsamplers[0]["conv"](F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior moments (B, 2*latent_channels, H/f, W/f), f = 2^(levels-1)."""

    def __init__(self, c):
        super().__init__()
        ch, n, g = c["block_out_channels"], c["layers_per_block"], c["norm_num_groups"]
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Block(ch[max(i - 1, 0)], ch[i], n, g, "down" if i < len(ch) - 1 else None)
                                          for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, c["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c["latent_channels"], 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h*f, w*f): the encoder mirrored, one more resnet a level."""

    def __init__(self, c):
        super().__init__()
        ch, n, g = c["block_out_channels"][::-1], c["layers_per_block"] + 1, c["norm_num_groups"]
        self.conv_in = nn.Conv2d(c["latent_channels"], ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList([Block(ch[max(i - 1, 0)], ch[i], n, g, "up" if i < len(ch) - 1 else None)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder: encode images in [-1, 1] to scaled latents and decode them back."""

    def __init__(self, config):
        super().__init__()
        c = {**VAE_DEFAULTS, **config}
        blocks = {*c.get("down_block_types", ["DownEncoderBlock2D"]), *c.get("up_block_types", ["UpDecoderBlock2D"])}
        if c["act_fn"] != "silu" or blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"} or c["latents_mean"]:
            raise ValueError(f"unsupported AutoencoderKL config (act_fn {c['act_fn']}, blocks {sorted(blocks)}, "
                             f"latents_mean {c['latents_mean']}): only the SD/SDXL-style KL-f8 layout is implemented")
        self.config, L = c, c["latent_channels"]
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if c["use_post_quant_conv"] else None
        self.latent_channels, self.scaling_factor = L, float(c["scaling_factor"])
        self.downsample_factor = 2 ** (len(c["block_out_channels"]) - 1)  # 8 for SD/SDXL: 256px -> 32x32
        self.shift_factor = None if c["shift_factor"] is None else float(c["shift_factor"])  # null for SDXL and ostris

    def encode(self, images, sample=True, generator=None, noise=None):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8): posterior sample (or mean), shifted and scaled for diffusion."""
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        z = mean
        if sample:  # the paper stores posterior samples, not means (SPEC A4); noise is drawn on the generator's device
            if noise is None:
                device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def decode(self, latents):
        """Scaled latents (B, C, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        z = latents.to(self.decoder.conv_in.weight.dtype) / self.scaling_factor + (self.shift_factor or 0.0)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


_OLD_VAE_NAMES = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]


def load_vae(repo_or_path=SDXL_VAE, subfolder="vae", device="cpu", dtype=torch.float32):
    """A frozen AutoencoderKL from a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    folders = [subfolder, None] if subfolder else [None]  # ostris/vae-kl-f8-d16 keeps its files at the root
    cfg_path, _, folder = _find(repo_or_path, ["config.json"], folders)
    weights, _, _ = _find(repo_or_path, ["diffusion_pytorch_model.safetensors"], [folder])
    with torch.device("meta"):
        vae = AutoencoderKL(_read_json(cfg_path))
    sd = {}
    for k, v in _load_weights(weights).items():  # files saved before diffusers 0.14 (e.g. SD 2.1's VAE) use old names
        for old, new in _OLD_VAE_NAMES:
            k = k.replace(old, new)
        sd[k] = v
    vae.name = f"{repo_or_path}/{folder or ''}".rstrip("/")  # where the weights came from
    _load_into(vae, sd, vae.name)
    vae.spec = {"type": "vae", "repo": _spec_repo(repo_or_path), "subfolder": subfolder,
                "scaling_factor": vae.scaling_factor, "latent_channels": vae.latent_channels}
    return _frozen(vae, device, dtype)

# -----------------------------------------------------------------------------
# Encoder specs: the frozen encoders of a dataset named as plain data. Every index.json's meta carries
# "text_encoder" and "latents" specs, train.py copies them into each checkpoint's config, and sample.py
# rebuilds the encoders from them. Every loader records the spec it was loaded from as `.spec`.

PIXELS = {"type": "pixels"}  # the shapes dataset: the 'latents' are the images themselves, in [-1, 1]


def text_encoder_from_spec(spec, device="cpu"):
    """The frozen text encoder a spec names: {'type': 'builtin', 'dim', 'max_len', 'context'} or {'type': 'clip', ...}."""
    if spec.get("type") == "builtin":  # runs on the CPU whatever the device; its output is moved by the caller
        return BuiltinTextEncoder(spec["dim"], spec["max_len"], spec.get("context", 0.0))  # older specs: none
    if spec.get("type") == "clip":
        return _checked(load_text_encoder(spec["repo"], spec.get("subfolder"), device=device), spec)
    raise ValueError(f"unknown text encoder spec {spec!r}: expected type 'builtin' or 'clip'")


def vae_from_spec(spec, device="cpu"):
    """The frozen VAE a latent spec names: an AutoencoderKL for {'type': 'vae', 'repo', ...}, None for pixels."""
    if spec.get("type") == "pixels":
        return None
    if spec.get("type") == "vae":
        return _checked(load_vae(spec["repo"], spec.get("subfolder"), device=device), spec)
    raise ValueError(f"unknown latent spec {spec!r}: expected type 'pixels' or 'vae'")


def _checked(encoder, spec):
    """The encoder, after checking that its weights have the shape and scale the spec recorded (a repo may change)."""
    bad = {k: (v, encoder.spec[k]) for k, v in spec.items()
           if k not in ("repo", "subfolder") and encoder.spec.get(k, v) != v}
    if bad:
        raise ValueError(f"{spec['repo']}: the loaded encoder differs from its spec (spec, loaded): {bad}")
    return encoder


@torch.no_grad()
def latents_to_images(x, spec, vae=None):
    """Latents (B, C, h, w) -> list of uint8 (H, W, 3) images: decoded by the spec's VAE (loaded if not given)."""
    if spec.get("type") == "vae":
        vae = vae if vae is not None else vae_from_spec(spec, x.device)
        x = vae.decode(x.to(vae.decoder.conv_in.weight.device))  # (B, 3, 8h, 8w), about [-1, 1]
    elif spec.get("type") != "pixels":
        raise ValueError(f"unknown latent spec {spec!r}: expected type 'pixels' or 'vae'")
    return list(latent_to_image(x))

# -----------------------------------------------------------------------------
# Latent shards. A dataset is a folder with index.json and shard-00000.safetensors, ...; each shard
# holds 'latents' (N, C, H, W) fp16, 'text' (N, L, D) fp16 and its captions as a JSON list in the
# safetensors metadata under 'captions'. index.json lists every shard with its record count and
# byte size, so a truncated or swapped file is caught before it is read. The same layout in a Hub
# dataset repo is read as hf://datasets/USER/NAME[@REVISION][/SUBDIR], one file at a time.

FORMAT = "latent-shards"
VERSION = 1


def _write_atomic(path, write):
    """Write a file through a temporary name, so a crash never leaves a half-written file under `path`."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


def _save_shard(path, latents, text, captions):
    """Write one shard file atomically; returns its index entry {'file', 'count', 'bytes'}."""
    def write(p):
        save_file({"latents": latents.half().contiguous(), "text": text.half().contiguous()}, p,
                  metadata={"captions": json.dumps(list(captions))})
        os.chmod(p, 0o644)  # safetensors creates files only their owner can read
    _write_atomic(path, write)
    return {"file": os.path.basename(path), "count": len(captions), "bytes": os.path.getsize(path)}


def _write_index(out_dir, shards, shard_size, latent_shape, text_shape, meta):
    """Write index.json last and atomically: until it exists, the folder is not a dataset."""
    index = {"format": FORMAT, "version": VERSION, "count": sum(s["count"] for s in shards), "shard_size": shard_size,
             "latent_shape": list(latent_shape), "text_shape": list(text_shape), "dtype": "float16",
             "meta": meta, "shards": shards}
    _write_atomic(os.path.join(out_dir, "index.json"), lambda p: Path(p).write_text(json.dumps(index, indent=1)))


class ShardWriter:
    """Write (latent, text, caption) records into fixed-size shards, then index.json last."""

    def __init__(self, out_dir, shard_size=4096, meta=None):
        if os.path.exists(os.path.join(out_dir, "index.json")):
            raise FileExistsError(f"{out_dir} already holds a dataset (index.json); delete it or write elsewhere")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.meta = out_dir, shard_size, meta or {}
        self.shards, self.buf, self.shapes, self.count = [], [], None, 0

    def add(self, latent, text, caption):
        latent, text = torch.as_tensor(latent).to(torch.float16), torch.as_tensor(text).to(torch.float16)
        shapes = (list(latent.shape), list(text.shape))
        self.shapes = self.shapes or shapes
        if shapes != self.shapes or not isinstance(caption, str):
            raise ValueError(f"ShardWriter({self.out_dir}): record {self.count} has latent/text shapes {shapes}"
                             f" and caption {caption!r}; expected {self.shapes} and a string")
        self.buf.append((latent, text, caption))
        self.count += 1
        if len(self.buf) == self.shard_size:
            self._flush()

    def _flush(self):
        latents, text, captions = zip(*self.buf)
        path = os.path.join(self.out_dir, f"shard-{len(self.shards):05d}.safetensors")
        self.shards.append(_save_shard(path, torch.stack(latents), torch.stack(text), captions))
        self.buf = []

    def close(self):
        if self.buf:
            self._flush()
        if not self.shards:
            raise ValueError(f"ShardWriter({self.out_dir}): no records were added")
        _write_index(self.out_dir, self.shards, self.shard_size, *self.shapes, self.meta)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:  # on an error no index.json is written, so the folder is not mistaken for a dataset
            self.close()


def resolve_file(root, name):
    """Local path of file `name` of the dataset at `root`, a folder or a Hub dataset (downloaded once, then cached)."""
    if root.startswith("hf://"):
        repo, revision, subdir = parse_hub_root(root)
        if path := _fetch(repo, name, subdir, repo_type="dataset", revision=revision):
            return path
        raise FileNotFoundError(f"{root}/{name}: no such file in the Hub dataset{_hint()}")
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {root} a dataset written by data.py?)")
    return path


def has_split(root, name):
    """True if the dataset at `root` (folder or Hub) has a split in its subfolder `name`, e.g. 'val'."""
    try:
        resolve_file(f"{root.rstrip('/')}/{name}", "index.json")
        return True
    except FileNotFoundError:
        return False


def read_index(root):
    """The dataset's index.json as a dict, checked for format and version."""
    path = resolve_file(root, "index.json")
    try:
        index = json.loads(Path(path).read_text())
        fields = [index[k] for k in ("format", "version", "shard_size", "latent_shape", "text_shape", "shards")]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid index ({type(e).__name__}: {e})") from e
    if fields[:2] != [FORMAT, VERSION]:
        raise ValueError(f"{path}: format {fields[0]!r} v{fields[1]}, expected {FORMAT!r} v{VERSION}")
    return index


def read_shard(root, index, i, path=None):
    """Shard i of a dataset as (latents fp16 (N,C,H,W), text fp16 (N,L,D), captions), checked against the index."""
    entry = index["shards"][i]
    path, n = path or resolve_file(root, entry["file"]), entry["count"]  # path: when already fetched
    if (size := os.path.getsize(path)) != entry["bytes"]:
        raise ValueError(f"{path}: {size} bytes but index.json says {entry['bytes']} (truncated or replaced?)")
    try:
        with safe_open(path, "pt") as f:
            latents, text = f.get_tensor("latents"), f.get_tensor("text")
            captions = json.loads(f.metadata()["captions"])
    except Exception as e:  # safetensors raises its own error types for a corrupt header or data
        raise ValueError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
    for key, t, shape in (("latents", latents, index["latent_shape"]), ("text", text, index["text_shape"])):
        if t.dtype != torch.float16 or list(t.shape) != [n] + shape:
            raise ValueError(f"{path}: {key} is {t.dtype} {list(t.shape)}, index.json says float16 {[n] + shape}")
    if len(captions) != n or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{path}: {len(captions)} captions for {n} records")
    return latents, text, captions


def load_all(root):
    """A whole (small) dataset in memory: {'latent': (N,C,H,W), 'text': (N,L,D) float32, 'caption': list}."""
    index = read_index(root)
    latents, text, captions = zip(*(read_shard(root, index, i) for i in range(len(index["shards"]))))
    return {"latent": torch.cat(latents).float(), "text": torch.cat(text).float(), "caption": sum(captions, [])}

# -----------------------------------------------------------------------------
# Streaming reader. Epoch e: shards are permuted by (seed, e), dealt to ranks, then to DataLoader
# workers; each worker reads its shards in groups of shuffle_buffer records (rounded up to whole
# shards) and yields each group's records in a random order. The order is a pure function of
# (seed, epoch, rank, world_size, worker, num_workers) computed from shard counts alone, so resuming
# at `start` skips whole epochs and groups without reading them. Since the reading order is known in
# advance, a background thread fetches the next `prefetch` groups (from the Hub: download into the HF
# cache) while the current one is consumed.


def _prefetched(pool, fn, items, ahead):
    """(item, fn(item)) for each item in order, with fn running in `pool` up to `ahead` items before it is needed."""
    queue = collections.deque()
    for item in items:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) > ahead:
            item, future = queue.popleft()
            yield item, future.result()
    while queue:
        item, future = queue.popleft()
        yield item, future.result()


class ShardStream(torch.utils.data.IterableDataset):
    """Endless shuffled stream of {'latent': (C,H,W), 'text': (L,D) float32, 'caption': str} from a folder or Hub."""

    def __init__(self, root, seed=0, rank=0, world_size=1, shuffle_buffer=8192, start=0, batch_size=1, prefetch=1):
        self.root, self.seed, self.rank, self.world_size = root, seed, rank, world_size
        self.start, self.batch_size = start, batch_size  # batch_size: the DataLoader's, to split `start` by worker
        self.prefetch = prefetch  # groups of shards fetched ahead of the one being read
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        self.index = read_index(root)
        counts = [s["count"] for s in self.index["shards"]]
        self.counts, self.offsets = np.array(counts), np.cumsum([0] + counts)  # offsets: first record id of shards
        self.group = max(1, math.ceil(shuffle_buffer / self.index["shard_size"]))  # shards shuffled together

    def _shards(self, epoch, worker, num_workers):
        """Shard ids this rank's worker reads in `epoch`, in order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        return perm[self.rank :: self.world_size][worker::num_workers]

    def _groups(self, epoch, worker, num_workers):
        """(shard ids, order of their concatenated records) for each group, in reading order."""
        shards = self._shards(epoch, worker, num_workers)
        for g in range(0, len(shards), self.group):
            ids = shards[g : g + self.group]
            n = int(self.counts[ids].sum())
            yield ids, np.random.default_rng([self.seed, epoch, int(ids[0])]).permutation(n)

    def epoch_order(self, epoch, worker=0, num_workers=1):
        """Global record ids (position in the dataset) in the order this rank's worker yields them in `epoch`."""
        return np.concatenate([np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in ids])[order]
                               for ids, order in self._groups(epoch, worker, num_workers)])

    def _reads(self, worker, num_workers, skip):
        """(shard ids, order of the records still to yield) of every group this worker reads, epoch after epoch."""
        epoch = 0
        while True:
            if skip >= (n := self.counts[self._shards(epoch, worker, num_workers)].sum()):
                skip, epoch = skip - n, epoch + 1
                continue
            for ids, order in self._groups(epoch, worker, num_workers):
                if skip >= len(order):
                    skip -= len(order)
                    continue
                yield ids, order[skip:]
                skip = 0
            epoch += 1

    def _fetch(self, read):
        """Local paths of the shards of one group (downloaded if the dataset is on the Hub)."""
        return [resolve_file(self.root, self.index["shards"][s]["file"]) for s in read[0]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if len(self.counts) < self.world_size * num_workers:
            raise ValueError(f"{self.root}: {len(self.counts)} shards cannot feed {self.world_size} ranks x "
                             f"{num_workers} workers; write smaller shards or use fewer workers")
        skip = self.start  # samples of this worker's stream to pass over
        if num_workers > 1:
            if self.start % self.batch_size:
                raise ValueError(f"ShardStream: start={self.start} is not a multiple of batch_size={self.batch_size}")
            # The DataLoader takes whole batches from its workers in turn and, after a restart, begins again
            # at worker 0; so worker w takes over the part of the worker that was due `extra` turns later.
            rounds, extra = divmod(self.start // self.batch_size, num_workers)
            worker = (worker + extra) % num_workers
            skip = (rounds + (worker < extra)) * self.batch_size
        pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        try:
            reads = self._reads(worker, num_workers, skip)
            for (ids, order), paths in _prefetched(pool, self._fetch, reads, self.prefetch):
                shards = [read_shard(self.root, self.index, int(s), path) for s, path in zip(ids, paths)]
                latents, text, captions = zip(*shards)
                latents, text, captions = torch.cat(latents), torch.cat(text), sum(captions, [])
                for j in order:
                    yield {"latent": latents[j].float(), "text": text[j].float(), "caption": captions[j]}
        finally:  # a stream dropped by its reader stops fetching; a download under way finishes in the background
            pool.shutdown(wait=False, cancel_futures=True)

# -----------------------------------------------------------------------------
# Preparing real data (SPEC A4): image-caption pairs -> resize the short side (bicubic), centre-crop,
# encode with the frozen VAE (posterior sample x scaling factor) and text encoder, store fp16. One shard
# dataset per resolution, OUT/<res>/. Input pair i always lands in shard i // shard_size and its posterior
# noise is drawn from its own stream (seed, i, res), so each shard is a pure function of its inputs: a
# rerun skips the shards OUT/prepare.json records as finished and recomputes the rest, and an interrupted
# run followed by a rerun writes the same bytes as one uninterrupted run. Pairs that cannot be used
# (unreadable image, missing or empty caption) are skipped and listed in OUT/report.json.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Pair(NamedTuple):
    image: str  # path of the image file
    caption: str  # the caption; None when it is in caption_file
    caption_file: str  # the same-name .txt beside the image (folder input), else None


def list_pairs(src):
    """Image-caption pairs of a folder (images with same-name .txt captions) or of a .jsonl/.csv (path, caption)."""
    if os.path.isdir(src):  # every image in the tree, in sorted order
        pairs = []
        for folder, dirs, files in os.walk(src):
            dirs.sort()
            pairs += [Pair(os.path.join(folder, f), None, os.path.join(folder, os.path.splitext(f)[0] + ".txt"))
                      for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
        return pairs
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such folder or file")
    if src.endswith(".jsonl"):
        rows = []
        with open(src, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                try:
                    rows += [(n, json.loads(line))] if line.strip() else []
                except ValueError as e:
                    raise ValueError(f"{src}:{n}: not JSON ({e})") from None
    elif src.endswith(".csv"):
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.DictReader(f), 2))  # line 1 is the header
    else:
        raise ValueError(f"{src}: expected a folder of images with .txt captions, or a .jsonl or .csv file")
    base, pairs = os.path.dirname(os.path.abspath(src)), []
    for n, row in rows:  # image paths are relative to the list's folder
        if not (isinstance(row, dict) and isinstance(row.get("path"), str) and isinstance(row.get("caption", 0), str)):
            raise ValueError(f"{src}:{n}: expected string fields 'path' and 'caption', got {str(row)[:100]}")
        pairs.append(Pair(os.path.join(base, row["path"]), row["caption"], None))
    return pairs


def resize_center_crop(img, res):
    """PIL image -> uint8 (res, res, 3): short side resized to res (bicubic), then the centre cropped (SPEC A4)."""
    w, h = img.size
    w2, h2 = max(res, round(w * res / min(w, h))), max(res, round(h * res / min(w, h)))
    left, top = (w2 - res) // 2, (h2 - res) // 2
    return np.asarray(img.resize((w2, h2), Image.BICUBIC).crop((left, top, left + res, top + res)))


def load_pair(pair, resolutions):
    """(list of uint8 (res, res, 3) images, caption), or (None, (reason, detail)) for a pair that is skipped."""
    caption = pair.caption
    if pair.caption_file:
        try:
            caption = Path(pair.caption_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, ("no caption file", os.path.basename(pair.caption_file))
        except (OSError, UnicodeDecodeError) as e:
            return None, ("unreadable caption file", f"{type(e).__name__}: {e}")
    if not caption.strip():
        return None, ("empty caption", "")
    try:
        with Image.open(pair.image) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")  # camera photos: apply the EXIF orientation
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... for broken files: all are reported
        return None, ("unreadable image", f"{type(e).__name__}: {e}")
    return [resize_center_crop(img, r) for r in resolutions], caption.strip()


def posterior_noise(vae, ids, res, seed):
    """The posterior noise (B, C, res/f, res/f) of inputs `ids`: each from its own stream, so no batch matters."""
    shape = (vae.latent_channels, res // vae.downsample_factor, res // vae.downsample_factor)
    return torch.from_numpy(np.stack([np.random.default_rng([seed, i, res]).standard_normal(shape, np.float32)
                                      for i in ids]))


@torch.no_grad()
def encode_batch(vae, enc, ids, images, captions, resolutions, seed=0, sample=True):
    """Loaded pairs -> ({res: latents (B, C, res/f, res/f)}, caption features (B, L, D)), fp16 on the CPU."""
    device, latents = vae.encoder.conv_in.weight.device, {}
    for j, r in enumerate(resolutions):
        x = image_to_latent(np.stack([im[j] for im in images])).to(device)  # (B, 3, r, r) in [-1, 1]
        noise = posterior_noise(vae, ids, r, seed).to(device) if sample else None
        latents[r] = vae.encode(x, sample=sample, noise=noise).half().cpu()
    return latents, enc(list(captions)).half().cpu()


def prepare(src, out, resolutions=(256, 512), vae=SDXL_VAE, vae_subfolder="vae", text_encoder=DFN5B_CLIP,
            text_encoder_subfolder=None, batch_size=32, device="cpu", shard_size=1024, seed=0, sample=True, workers=8):
    """Encode the image-caption pairs of `src` into a shard dataset OUT/<res>/ per resolution; returns the report."""
    t0, pairs = time.time(), list_pairs(src)
    if not pairs:
        raise ValueError(f"{src}: no image-caption pairs found (images: {', '.join(IMAGE_EXTS)})")
    vae, enc = load_vae(vae, vae_subfolder, device), load_text_encoder(text_encoder, text_encoder_subfolder, device)
    f = vae.downsample_factor
    if bad := [r for r in resolutions if r % f]:
        raise ValueError(f"--res {bad}: not multiples of the VAE's downsampling factor {f}")
    base = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    names = [os.path.relpath(p.image, base) for p in pairs]  # as the report lists them
    settings = {"source": os.path.abspath(src), "pairs": len(pairs), "resolutions": list(resolutions),
                "pairs_crc32": zlib.crc32(json.dumps([names, [p.caption for p in pairs]]).encode()),
                "shard_size": shard_size, "seed": seed, "posterior": "sample" if sample else "mean",
                "text_encoder": enc.spec, "latents": vae.spec}
    state_path, dirs = os.path.join(out, "prepare.json"), {r: os.path.join(out, str(r)) for r in resolutions}
    state = _read_json(state_path) if os.path.exists(state_path) else {"settings": settings, "shards": {}}
    if state["settings"] != settings:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        raise ValueError(f"{out} holds shards prepared from other inputs or settings (then, now): {diff}; "
                         f"delete it or prepare into another folder")
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    file = lambda k: f"shard-{k:05d}.safetensors"

    def finished(k):  # recorded in prepare.json, and each of its files is there with the recorded size
        entry = state["shards"].get(str(k))
        return entry is not None and all(os.path.isfile(p := os.path.join(dirs[int(r)], file(k)))
                                         and os.path.getsize(p) == size for r, size in entry["bytes"].items())
    chunks = [range(a, min(a + shard_size, len(pairs))) for a in range(0, len(pairs), shard_size)]  # one per shard
    todo = [k for k in range(len(chunks)) if not finished(k)]
    done = len(pairs) - sum(len(chunks[k]) for k in todo)
    load, t1 = (lambda i: load_pair(pairs[i], resolutions)), time.time()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(pairs), initial=done, desc="prepare", unit="img") as bar:
        for k in todo:
            latents, text, captions, skipped, batch = {r: [] for r in resolutions}, [], [], [], []
            for n, (i, (images, info)) in enumerate(_prefetched(pool, load, chunks[k], 2 * batch_size), 1):
                if images is None:  # info: (reason, detail)
                    skipped.append({"path": names[i], "reason": info[0], "detail": info[1]})
                else:  # info: the caption
                    batch.append((i, images, info))
                if batch and (len(batch) == batch_size or n == len(chunks[k])):
                    ids, images, texts = zip(*batch)
                    z, y = encode_batch(vae, enc, ids, images, texts, resolutions, seed, sample)
                    for r in resolutions:
                        latents[r].append(z[r])
                    text, captions, batch = text + [y], captions + list(texts), []
                bar.update()
            entry = {"count": len(captions), "bytes": {}, "skipped": skipped}
            for r in resolutions if captions else []:  # a shard whose every pair was skipped has no file
                saved = _save_shard(os.path.join(dirs[r], file(k)), torch.cat(latents[r]), torch.cat(text), captions)
                entry["bytes"][str(r)] = saved["bytes"]
            state["shards"][str(k)] = entry  # recorded only once all its files are written
            _write_atomic(state_path, lambda p: Path(p).write_text(json.dumps(state, indent=1)))

    entries = [state["shards"][str(k)] for k in range(len(chunks))]
    for r in resolutions:
        meta = {"dataset": "prepared", "source": settings["source"], "res": r, "seed": seed,
                "posterior": settings["posterior"], "text_encoder": enc.spec, "latents": vae.spec,
                "text_dim": enc.dim, "max_len": enc.max_len, "latent": "vae"}  # the last three as in the shapes meta
        shards = [{"file": file(k), "count": e["count"], "bytes": e["bytes"][str(r)]}
                  for k, e in enumerate(entries) if e["count"]]
        if shards:
            _write_index(dirs[r], shards, shard_size, (vae.latent_channels, r // f, r // f),
                         (enc.max_len, enc.dim), meta)
    skipped = [s for e in entries for s in e["skipped"]]
    seconds, written = time.time() - t0, sum(e["count"] for e in entries)  # pairs/s: without loading the encoders
    report = {"source": settings["source"], "pairs": len(pairs), "written": written, "skipped": len(skipped),
              "reasons": dict(collections.Counter(s["reason"] for s in skipped)), "datasets": list(dirs.values()),
              "shards": len(chunks), "shards_already_done": len(chunks) - len(todo), "seconds": round(seconds, 2),
              "pairs_per_s": round((len(pairs) - done) / (time.time() - t1), 2), "skipped_pairs": skipped}
    _write_atomic(os.path.join(out, "report.json"), lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    reasons = ", ".join(f"{v} {k}" for k, v in report["reasons"].items()) or "none"
    print(f"prepare: {written} of {len(pairs)} pairs -> {', '.join(dirs.values())}; skipped {len(skipped)} "
          f"({reasons}), listed in {os.path.join(out, 'report.json')}; {len(chunks) - len(todo)} of {len(chunks)} "
          f"shards were already done; {len(pairs) - done} pairs encoded ({report['pairs_per_s']:.0f}/s), "
          f"{seconds:.1f}s in all")
    if not written:
        raise ValueError(f"{src}: none of the {len(pairs)} pairs could be used; see {out}/report.json")
    return report

# -----------------------------------------------------------------------------
# Writing the shapes dataset, and the command line.


def _write_shapes(out, scenes, res, enc, shard_size, meta, desc):
    """Render scenes and write them as shards to `out`, with a progress bar."""
    with ShardWriter(out, shard_size, meta) as writer, tqdm(total=len(scenes), desc=desc, unit="img") as bar:
        for b in range(0, len(scenes), 1024):  # encode captions a batch at a time
            chunk = scenes[b : b + 1024]
            texts = [caption(s) for s in chunk]
            latents = image_to_latent(np.stack([render(s, res) for s in chunk]))  # (B, 3, H, W)
            for latent, feats, text in zip(latents, enc(texts), texts):
                writer.add(latent, feats, text)
            bar.update(len(chunk))


def make_shapes_dataset(out, n, res=32, seed=0, shard_size=4096, text_dim=64, max_len=24, val=512, context=0.7):
    """Write the shapes dataset (n train images in out/, `val` held-out ones in out/val/) unless it exists."""
    # below 16px the scorer cannot tell shapes apart, but 8px images still serve the fast plumbing tests
    if n < 1 or res < 8:
        raise ValueError(f"make_shapes_dataset: need n >= 1 and res >= 8, got n={n}, res={res}")
    enc = BuiltinTextEncoder(text_dim, max_len, context)
    scenes_id = zlib.crc32(json.dumps([COLOURS, POSITIONS, SIZES, GAP, SUPERSAMPLE, HELDOUT_EVERY]).encode())
    request = {"dataset": "shapes", "n": n, "res": res, "seed": seed, "val": val, "text_dim": text_dim,
               "max_len": max_len}
    meta = {**request, "latent": "pixels", "encoder": enc.name, "scenes_id": scenes_id, "text_encoder": enc.spec,
            "latents": PIXELS}
    if os.path.exists(os.path.join(out, "index.json")):  # written last, so the dataset is complete
        if (old := read_index(out)["meta"]) == meta:
            print(f"{out}: using the shapes dataset already there")
            return out
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if any(old.get(k) != v for k, v in request.items()):
            raise ValueError(f"{out} holds a different dataset (existing, requested): {diff}; delete it or pick "
                             f"another folder")
        # The same request written by another version of this file: the dataset is a pure function of the
        # request and the code, so it is safe to write it again (a data_cache folder simply follows the code).
        print(f"{out}: rewriting the shapes dataset, written by another version of data.py (changed: {sorted(diff)})")
        os.remove(os.path.join(out, "index.json"))
    t0 = time.time()
    if val:
        val_dir = os.path.join(out, "val")
        if os.path.exists(os.path.join(val_dir, "index.json")):  # left by an interrupted run, or an older version
            os.remove(os.path.join(val_dir, "index.json"))
        scenes = [parse_caption(c) for c in heldout_captions(val, seed)]
        _write_shapes(val_dir, scenes, res, enc, shard_size, {**meta, "split": "val"}, "shapes val")
    _write_shapes(out, [train_scene(seed, i) for i in range(n)], res, enc, shard_size, meta, "shapes train")
    dt = time.time() - t0
    print(f"{out}: wrote {n} train + {val} val images at {res}px in {dt:.1f}s ({(n + val) / dt:.0f} images/s)")
    return out


def main():
    parser = argparse.ArgumentParser(description="Write latent shard datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="the built-in synthetic shapes dataset (pixels are the latents)")
    p.add_argument("--out", required=True, help="output folder; the held-out split goes to OUT/val")
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--res", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes (the dataset is a pure function of it)")
    p.add_argument("--shard-size", type=int, default=4096, help="records per shard")
    p.add_argument("--text-dim", type=int, default=64, help="built-in text encoder width")
    p.add_argument("--max-len", type=int, default=24, help="caption tokens (padded or truncated)")
    p.add_argument("--text-context", type=float, default=0.7, help="built-in text encoder's causal context; 0 = none")
    p.add_argument("--val", type=int, default=512, help="held-out images written to OUT/val (0: none)")
    p = sub.add_parser("prepare", help="encode image-caption pairs into VAE latents + caption features (resumable)")
    p.add_argument("--input", required=True, help="a folder of images with same-name .txt captions, or a .jsonl "
                   "or .csv with 'path' (relative to its folder) and 'caption'")
    p.add_argument("--out", required=True, help="output folder: OUT/<res>/ per resolution, OUT/report.json")
    p.add_argument("--res", type=int, nargs="+", default=[256, 512], help="image sides (short side resized, centre "
                   "crop)")
    p.add_argument("--vae", default=SDXL_VAE, help="Hub repo or local folder of a diffusers AutoencoderKL")
    p.add_argument("--vae-subfolder", default="vae", help="its subfolder (the repo root is tried next)")
    p.add_argument("--text-encoder", default=DFN5B_CLIP, help="Hub repo or local folder of a CLIP model "
                   "(open_clip or transformers layout)")
    p.add_argument("--text-encoder-subfolder", default=None, help="its subfolder, e.g. text_encoder_2")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--shard-size", type=int, default=1024, help="input pairs per shard (skipped ones leave gaps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sample", dest="sample", action="store_true", default=True,
                   help="store posterior samples x scaling factor, as the paper (default)")
    g.add_argument("--mean", dest="sample", action="store_false", help="store posterior means instead")
    args = parser.parse_args()
    if args.command == "shapes":
        make_shapes_dataset(args.out, args.n, args.res, args.seed, args.shard_size, args.text_dim, args.max_len,
                            args.val, args.text_context)
    else:
        prepare(args.input, args.out, args.res, args.vae, args.vae_subfolder, args.text_encoder,
                args.text_encoder_subfolder, args.batch_size, args.device, args.shard_size, args.seed, args.sample,
                args.workers)


if __name__ == "__main__":
    main()
