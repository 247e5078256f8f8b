"""
The built-in dataset: captioned 32x32 images of one or two coloured shapes, made from nothing and scored
exactly. A scene ("a small red circle on the left and a large blue square at the top") is drawn, rendered,
and its caption encoded by a frozen built-in text encoder; a GenEval-style scorer reads a caption and checks
each object's shape, colour and position in an image. data.py writes the scenes as latent shards (the pixels
in [-1, 1] are the "latents"), and train.py evaluates every run with the scorer on held-out captions.
"""
import itertools
import re
import zlib
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

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
    "left": (0.23, 0.5), "right": (0.77, 0.5), "top": (0.5, 0.23), "bottom": (0.5, 0.77),
    "center": (0.5, 0.5),
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
    """Plain-English caption of a scene,
    e.g. 'a small red circle on the left and a large blue square at the top'."""
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
    x, y = POSITIONS[o.position]  # the centre
    h = SIZES[o.size] / 2
    return x - h, y - h, x + h, y + h


def _compatible(a, b):
    """Two objects may share an image: different colours, boxes apart by GAP along x or y
    (so other positions)."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    apart = max(bx0 - ax1, ax0 - bx1) >= GAP or max(by0 - ay1, ay0 - by1) >= GAP
    return a.colour != b.colour and apart


def sample_scene(rng):
    """One random scene (one or two objects, equally likely) from a numpy Generator."""
    def pick(names):
        return names[rng.integers(len(names))]

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
    while True:  # draw again until the scene is not a held-out one
        scene = sample_scene(rng)
        if not is_heldout(scene):
            return scene


def distinct_scenes(seed, n):
    """The first n distinct training scenes of `seed`, in train_scene's order (repeats skipped): a smaller
    world than the full stream, for the diversity-versus-size ablation."""
    pool = {}  # a dict as an ordered set of scenes
    i = 0
    while len(pool) < n:
        pool.setdefault(train_scene(seed, i), None)
        i += 1
        if i > 1000 * n:
            raise ValueError(f"distinct_scenes: only {len(pool)} distinct scenes in {i} draws, {n} asked for")
    return list(pool)


def partial_caption(scene, rng):
    """A caption naming a random part of each object's attributes: size, colour, shape and position are each
    named with probability 1/2 (an unnamed shape reads 'shape'), e.g. 'a red shape at the top'."""
    def words(o):
        size, colour, shape, where = (rng.random(4) < 0.5).tolist()  # which attributes are named
        out = ["a"]
        if size:
            out.append(o.size)
        if colour:
            out.append(o.colour)
        out.append(o.shape if shape else "shape")
        if where:
            out.append(PHRASES[o.position])
        return " ".join(out)

    return " and ".join(words(o) for o in scene)


# Every word of the captions above (caption, partial_caption). The built-in text encoder turns any word into a
# vector, but a model trained on this dataset has seen only these: sample.py names the others in a warning.
VOCABULARY = frozenset(" ".join(["a and shape", *SIZES, *COLOURS, *SHAPES, *PHRASES.values()]).split())


def heldout_captions(n=512, seed=0):
    """n captions of held-out scenes, which training data never contains;
    no scene repeats before all are used."""
    objs = [Obj(*o) for o in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES)]
    scenes = [s for s in itertools.combinations(objs, 2) if _compatible(*s) and is_heldout(s)]  # 526 of 4320
    rng = np.random.default_rng([seed, 2**32 - 1])  # a stream no training index (seed, i) uses
    repeats = max(1, -(-n // len(scenes)))  # ceil(n / len(scenes)) shuffled passes over the scenes
    order = np.concatenate([rng.permutation(len(scenes)) for _ in range(repeats)])[:n]
    captions = []
    for i in order:
        step = rng.choice([1, -1])  # the two objects in either order
        captions.append(caption(scenes[i][::step]))
    return captions


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


# The images are the dataset's "latents": pixels in [-1, 1], stored and trained on as they are.
PIXELS = {"type": "pixels"}  # the latent spec of this dataset (encoders.py: encoder specs)


def image_to_latent(img):
    """PIL image or uint8 (..., H, W, 3) -> float32 tensor (..., 3, H, W) in [-1, 1]."""
    # np.array makes a copy: PIL's arrays are read-only
    return torch.from_numpy(np.array(img)).movedim(-1, -3).float() / 127.5 - 1


def latent_to_image(x):
    """float tensor (N, 3, H, W) in [-1, 1] -> uint8 numpy (N, H, W, 3), ready for score()."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# GenEval-style scorer: find the coloured blobs in an image, then check each caption object.
# Pixels are classified by the direction of their RGB vector, which anti-aliasing against the
# black background, blur and mild noise leave nearly unchanged; its length gives the coverage.


Blob = NamedTuple("Blob", [("colour", str), ("position", str), ("shape", str),
                           ("area", float)])  # area in pixels


_PAL = np.array(list(COLOURS.values()), np.float32) / 255  # (K, 3)
_PAL_UNIT = _PAL / np.linalg.norm(_PAL, axis=1, keepdims=True)
_ANCHORS = np.array(list(POSITIONS.values()))  # (5, 2)


def find_blobs(image):
    """The coloured objects in one uint8 (H, W, 3) image, with their colour, position and shape."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"find_blobs: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    x = image.astype(np.float32) / 255  # (H, W, 3)
    res = image.shape[0]
    proj = x @ _PAL_UNIT.T  # (H, W, K) length along each palette direction
    k = proj.argmax(-1)
    cos = proj.max(-1) / (np.linalg.norm(x, axis=-1) + 1e-6)
    # coverage of the pixel by the object
    alpha = np.clip(proj.max(-1) / np.linalg.norm(_PAL, axis=1)[k], 0, 1)
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
            area = w.sum()
            cy = (ys * w).sum() / w.sum()  # the coverage-weighted centroid
            cx = (xs * w).sum() / w.sum()
            u = np.stack([xs - cx, ys - cy])  # (2, P) offsets from the centroid
            # (4, P) along x, y, diagonals
            u = np.concatenate([u, np.stack([u[0] + u[1], u[0] - u[1]]) / 2**0.5])
            m2 = (w * u**2).sum(1) / area  # (4,) central moments along the four directions
            m3 = (w * u**3).sum(1) / area
            m4 = (w * u**4).sum(1) / area
            var = m2[:2].mean()
            if m2[:2].min() < 0.1 or area / var < 6:  # a solid shape has area/variance 10-13, noise far less
                continue
            # A triangle pointing up has its mass skewed down (skewness -0.57 along y). A square's profile
            # is uniform along an axis and triangular along a diagonal, fourth cumulants -1.2 and -0.6
            # var^2; a circle's is the same in every direction. Blur adds no third or fourth cumulant, so
            # both tests survive it, only shrinking as blur adds to the variance.
            k4 = m4 - 3 * m2**2
            skew = m3[1] / m2[1] ** 1.5
            corners = (k4[:2].sum() - k4[2:].sum()) / 2 / var**2
            if skew < -0.15:
                shape = "triangle"
            elif corners < -0.25:
                shape = "square"
            else:
                shape = "circle"
            where = (cx + sl[1].start + 0.5) / res, (cy + sl[0].start + 0.5) / res  # (x, y), fractions
            position = list(POSITIONS)[np.argmin(((_ANCHORS - where) ** 2).sum(1))]  # the nearest anchor
            blobs.append(Blob(name, position, shape, float(area)))
    return blobs


def _agree(o, b):
    """How many of shape, colour and position a blob (or None) shares with a caption object."""
    if b is None:
        return 0
    return (o.shape == b.shape) + (o.colour == b.colour) + (o.position == b.position)


def score(images, captions):
    """Per-attribute accuracy of images against their captions:
    {'shape', 'colour', 'position', 'count', 'mean'}."""
    if len(images) != len(captions):
        raise ValueError(f"score: {len(images)} images but {len(captions)} captions")
    hits = {"shape": [], "colour": [], "position": [], "count": []}
    for img, text in zip(images, captions):
        scene = parse_caption(text)
        if isinstance(img, Image.Image):
            img = img.convert("RGB")
        blobs = find_blobs(img)
        hits["count"].append(len(blobs) == len(scene))
        # Give each caption object its own blob (or none), agreeing on as many attributes as possible, then
        # the largest blobs; so a wrong colour costs the colour only, and a swap of colours between two
        # objects (wrong binding) shows up as wrong colours.
        blobs = sorted(blobs, key=lambda b: -b.area)[:8]

        def key(bs):  # (attributes agreed on, area matched) of one assignment of blobs to the objects
            return (sum(_agree(o, b) for o, b in zip(scene, bs)), sum(b.area for b in bs if b is not None))

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
    """Word tokens -> fixed random vectors seeded by crc32(word), plus a sinusoidal position code, plus a
    causal context: a decaying sum (factor `context` per word) of second vectors, seeded by
    crc32('ctx:' + word), of the words before. As in a causal CLIP text tower, 'left' in
    'a red circle on the left' then carries 'red' and 'circle'. Without it (context=0) each token knows
    only its word and place, and a small model rarely learns which colour goes with which object:
    MicroDiT_S at 1,000 steps scored colour 0.75 without, 0.98 with."""

    def __init__(self, dim=64, max_len=24, context=0.7):
        if dim < 2 or dim % 2:
            raise ValueError(f"BuiltinTextEncoder: dim must be even and >= 2, got {dim}")
        if not 0 <= context < 1:
            raise ValueError(f"BuiltinTextEncoder: context must be in [0, 1), got {context}")
        self.dim = dim
        self.max_len = max_len
        self.context = context
        self.name = f"builtin-crc32-{dim}"
        if context:
            self.name += f"-ctx{context:g}"
        self.spec = {"type": "builtin", "dim": dim, "max_len": max_len, "context": context}
        pos = torch.arange(max_len)[:, None]  # (L, 1)
        freq = 10000 ** (-torch.arange(0, dim, 2) / dim)  # (D/2,)
        self.pos = torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], -1).reshape(max_len, dim)
        self._vectors = {}  # word -> (D,) float32 numpy array
        # '<' and ':' cannot occur in a word token, so no word shares these
        self.pad = torch.from_numpy(self._vector("<pad>"))

    def _vector(self, word):
        # RandomState's stream is frozen across numpy versions; crc32 across runs
        if word not in self._vectors:
            rs = np.random.RandomState(zlib.crc32(word.encode()))
            self._vectors[word] = rs.standard_normal(self.dim).astype(np.float32)
        return self._vectors[word]

    def words(self, text):
        """The word tokens of a caption, before they are cut to max_len: its runs of a-z and 0-9, lower-cased
        (anything else, such as punctuation, accented letters or emoji, is dropped)."""
        return re.findall(r"[a-z0-9]+", text.lower())

    def __call__(self, captions):
        if isinstance(captions, str):
            raise TypeError("text encoder: pass a list of captions, not one string")
        out = np.tile(self.pad.numpy(), (len(captions), self.max_len, 1))  # (B, L, D), in numpy: fast per row
        for b, text in enumerate(captions):
            words = []
            if isinstance(text, str):
                words = self.words(text)[: self.max_len]
            if not words:
                raise ValueError(f"text encoder: caption {b} has no words: {text!r}")
            row = np.stack([self._vector(w) for w in words]) + self.pos.numpy()[: len(words)]  # (n, D)
            if self.context:
                ctx = [np.zeros(self.dim, np.float32)]  # (D,) what the words before each one said
                for w in words[:-1]:
                    ctx.append(np.float32(self.context) * ctx[-1] + self._vector("ctx:" + w))
                row += np.stack(ctx)
            out[b, : len(words)] = row
        return torch.from_numpy(out)
