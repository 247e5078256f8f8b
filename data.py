"""Data: the built-in shapes dataset, its scorer and text encoder, latent shards and a streaming reader."""
import argparse
import itertools
import json
import math
import os
import re
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

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
    return torch.from_numpy(np.asarray(img)).movedim(-1, -3).float() / 127.5 - 1


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
    """Word tokens -> fixed random vectors seeded by crc32(word), plus a sinusoidal position code."""

    def __init__(self, dim=64, max_len=24):
        if dim < 2 or dim % 2:
            raise ValueError(f"BuiltinTextEncoder: dim must be even and >= 2, got {dim}")
        self.dim, self.max_len, self.name = dim, max_len, f"builtin-crc32-{dim}"
        pos, freq = torch.arange(max_len)[:, None], 10000 ** (-torch.arange(0, dim, 2) / dim)
        self.pos = torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], -1).reshape(max_len, dim)
        self._vectors = {}
        self.pad = self._vector("<pad>")  # '<' cannot occur in a word token, so no word shares it

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
        return out

# -----------------------------------------------------------------------------
# Latent shards. A dataset is a folder with index.json and shard-00000.safetensors, ...; each shard
# holds 'latents' (N, C, H, W) fp16, 'text' (N, L, D) fp16 and its captions as a JSON list in the
# safetensors metadata under 'captions'. index.json lists every shard with its record count and
# byte size, so a truncated or swapped file is caught before it is read.

FORMAT = "latent-shards"
VERSION = 1


def _write_atomic(path, write):
    """Write a file through a temporary name, so a crash never leaves a half-written file under `path`."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


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
        from safetensors.torch import save_file
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = os.path.join(self.out_dir, name)
        latents, text, captions = zip(*self.buf)
        tensors = {"latents": torch.stack(latents), "text": torch.stack(text)}

        def write(p):
            save_file(tensors, p, metadata={"captions": json.dumps(captions)})
            os.chmod(p, 0o644)  # safetensors creates files only their owner can read
        _write_atomic(path, write)
        self.shards.append({"file": name, "count": len(captions), "bytes": os.path.getsize(path)})
        self.buf = []

    def close(self):
        if self.buf:
            self._flush()
        if not self.shards:
            raise ValueError(f"ShardWriter({self.out_dir}): no records were added")
        index = {"format": FORMAT, "version": VERSION, "count": self.count, "shard_size": self.shard_size,
                 "latent_shape": self.shapes[0], "text_shape": self.shapes[1], "dtype": "float16",
                 "meta": self.meta, "shards": self.shards}
        path = os.path.join(self.out_dir, "index.json")
        _write_atomic(path, lambda p: Path(p).write_text(json.dumps(index, indent=1)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:  # on an error no index.json is written, so the folder is not mistaken for a dataset
            self.close()


def resolve_file(root, name):
    """Local path of file `name` of the dataset at `root`: the one place a Hub download would plug in."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {root} a dataset written by data.py?)")
    return path


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


def read_shard(root, index, i):
    """Shard i of a dataset as (latents fp16 (N,C,H,W), text fp16 (N,L,D), captions), checked against the index."""
    from safetensors import safe_open
    entry = index["shards"][i]
    path, n = resolve_file(root, entry["file"]), entry["count"]
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
# at `start` skips whole epochs and groups without reading them.


class ShardStream(torch.utils.data.IterableDataset):
    """Endless shuffled stream of {'latent': (C,H,W), 'text': (L,D) float32, 'caption': str} from shards."""

    def __init__(self, root, seed=0, rank=0, world_size=1, shuffle_buffer=8192, start=0, batch_size=1):
        self.root, self.seed, self.rank, self.world_size = root, seed, rank, world_size
        self.start, self.batch_size = start, batch_size  # batch_size: the DataLoader's, to split `start` by worker
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
        epoch = 0
        while True:
            if skip >= (n := self.counts[self._shards(epoch, worker, num_workers)].sum()):
                skip, epoch = skip - n, epoch + 1
                continue
            for ids, order in self._groups(epoch, worker, num_workers):
                if skip >= len(order):
                    skip -= len(order)
                    continue
                latents, text, captions = zip(*(read_shard(self.root, self.index, int(s)) for s in ids))
                latents, text, captions = torch.cat(latents), torch.cat(text), sum(captions, [])
                for j in order[skip:]:
                    yield {"latent": latents[j].float(), "text": text[j].float(), "caption": captions[j]}
                skip = 0
            epoch += 1

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


def make_shapes_dataset(out, n, res=32, seed=0, shard_size=4096, text_dim=64, max_len=24, val=512):
    """Write the shapes dataset (n train images in out/, `val` held-out ones in out/val/) unless it exists."""
    # below 16px the scorer cannot tell shapes apart, but 8px images still serve the fast plumbing tests
    if n < 1 or res < 8:
        raise ValueError(f"make_shapes_dataset: need n >= 1 and res >= 8, got n={n}, res={res}")
    enc = BuiltinTextEncoder(text_dim, max_len)
    scenes_id = zlib.crc32(json.dumps([COLOURS, POSITIONS, SIZES, GAP, SUPERSAMPLE, HELDOUT_EVERY]).encode())
    meta = {"dataset": "shapes", "latent": "pixels", "n": n, "res": res, "seed": seed, "val": val,
            "encoder": enc.name, "text_dim": text_dim, "max_len": max_len, "scenes_id": scenes_id}
    if os.path.exists(os.path.join(out, "index.json")):  # written last, so the dataset is complete
        if (old := read_index(out)["meta"]) != meta:
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            raise ValueError(f"{out} holds a different dataset (existing, requested): {diff}; delete it or pick "
                             f"another folder")
        print(f"{out}: using the shapes dataset already there")
        return out
    t0 = time.time()
    if val:
        val_dir = os.path.join(out, "val")
        if os.path.exists(os.path.join(val_dir, "index.json")):  # left by an interrupted run
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
    p.add_argument("--val", type=int, default=512, help="held-out images written to OUT/val (0: none)")
    args = parser.parse_args()
    make_shapes_dataset(args.out, args.n, args.res, args.seed, args.shard_size, args.text_dim, args.max_len,
                        args.val)


if __name__ == "__main__":
    main()
