"""Tests of shapes.py: the built-in scenes and their rendering, the scorer, and the built-in text encoder."""
import re
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import shapes
from encoders import text_encoder_from_spec
from shapes import Obj


@pytest.fixture(scope="module")
def dataset_images():
    """300 training scenes at 32px, their captions and uint8 images (N, 32, 32, 3)."""
    scenes = [shapes.train_scene(123, i) for i in range(300)]
    return scenes, [shapes.caption(s) for s in scenes], np.stack([np.asarray(shapes.render(s)) for s in scenes])

# -----------------------------------------------------------------------------
# shapes dataset


def test_caption_round_trip():
    for i in range(500):
        scene = shapes.train_scene(0, i)
        assert shapes.parse_caption(shapes.caption(scene)) == scene
    text = "a small red circle on the left and a large blue square at the bottom"
    assert shapes.parse_caption(text) == (Obj("circle", "red", "left", "small"), Obj("square", "blue", "bottom", "large"))
    assert shapes.parse_caption("A Large Cyan Triangle in the center.") == (Obj("triangle", "cyan", "center", "large"),)
    for bad in ["a red circle on the left", "a small pink circle on the left", "", "a small red circle"]:
        with pytest.raises(ValueError, match="caption"):
            shapes.parse_caption(bad)


@pytest.mark.parametrize("shape, fraction", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_render_matches_geometry(shape, fraction):
    # Closed forms, not the scorer: the object's coverage (red channel / palette red) sums to its
    # area, its bounding box is where POSITIONS and SIZES put it, and it is drawn in its palette colour.
    for res in (16, 32, 64):
        img = np.asarray(shapes.render((Obj(shape, "red", "left", "large"),), res)).astype(np.float64)
        side = shapes.SIZES["large"] * res
        assert img.shape == (res, res, 3)
        assert abs(img[..., 0].sum() / 235 - fraction * side**2) < 0.04 * side**2
        ys, xs = np.nonzero(img[..., 0] > 235 / 2)
        x0, y0 = (shapes.POSITIONS["left"][0] - shapes.SIZES["large"] / 2) * res, (0.5 - shapes.SIZES["large"] / 2) * res
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - (x0 + side)) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - (y0 + side)) <= 1
        inside = img[ys, xs]
        assert np.abs(np.median(inside, 0) - shapes.COLOURS["red"]).max() < 20
        assert img[:, int(x0 + side) + 3 :].max() == 0  # background beyond the LANCZOS kernel (3 pixels)


def test_objects_never_overlap_and_differ(dataset_images):
    scenes, _, images = dataset_images
    two = [s for s in scenes if len(s) == 2]
    assert 0.35 < len(two) / len(scenes) < 0.65  # one or two objects, equally likely
    for a, b in two:
        assert a.colour != b.colour and a.position != b.position
        # Pixels at least half covered by one object are at least a pixel away from the other's.
        one_a, one_b = (np.asarray(shapes.render((o,))).max(-1) > 235 / 2 for o in (a, b))
        assert not (ndimage.binary_dilation(one_a, np.ones((3, 3))) & one_b).any()


def test_determinism():
    scenes = [shapes.train_scene(7, i) for i in range(50)]
    assert scenes == [shapes.train_scene(7, i) for i in range(50)]
    assert scenes != [shapes.train_scene(8, i) for i in range(50)]
    assert shapes.render(scenes[3]).tobytes() == shapes.render(scenes[3]).tobytes()
    assert shapes.heldout_captions(40, seed=1) == shapes.heldout_captions(40, seed=1)
    assert shapes.heldout_captions(40, seed=1) != shapes.heldout_captions(40, seed=2)


def test_heldout_never_in_training():
    heldout = [shapes.parse_caption(c) for c in shapes.heldout_captions(1000)]
    assert all(len(s) == 2 and shapes.is_heldout(s) for s in heldout)
    assert all(shapes.is_heldout(s[::-1]) for s in heldout)  # "A and B" is held out exactly when "B and A" is
    canonical = [shapes.caption(sorted(s)) for s in heldout]
    distinct = len(set(canonical))
    assert 300 < distinct < 1000 and len(set(canonical[:distinct])) == distinct  # each scene once, then repeats
    # The unfiltered sampler does draw held-out scenes, so the filter has work to do ...
    rng = np.random.default_rng(0)
    raw = [shapes.sample_scene(rng) for _ in range(3000)]
    assert 0.03 < np.mean([shapes.is_heldout(s) for s in raw]) < 0.1
    assert any(shapes.caption(sorted(s)) in set(canonical) for s in raw)
    # ... and the training generator never emits one.
    train = [shapes.train_scene(0, i) for i in range(3000)]
    assert not any(shapes.is_heldout(s) or shapes.caption(sorted(s)) in set(canonical) for s in train)


def test_distinct_scenes_and_partial_captions():
    pool = shapes.distinct_scenes(3, 200)
    assert len(set(pool)) == 200 and pool == shapes.distinct_scenes(3, 200)
    stream = [shapes.train_scene(3, i) for i in range(400)]
    assert pool == list(dict.fromkeys(stream))[:200]  # the stream's own order, repeats skipped
    assert not any(shapes.is_heldout(s) for s in pool)
    # partial captions: per object, a random subset of the attributes, an unnamed shape read as "shape"
    rng, named = np.random.default_rng(0), {"size": 0, "colour": 0, "shape": 0, "position": 0}
    n = 0
    for scene in stream:
        text = shapes.partial_caption(scene, rng)
        parts = text.split(" and ")
        assert len(parts) == len(scene)
        for o, part in zip(scene, parts):
            n += 1
            words = part.split()
            assert words[0] == "a" and (o.shape in words or "shape" in words)
            named["size"] += o.size in words
            named["colour"] += o.colour in words
            named["shape"] += o.shape in words
            named["position"] += part.endswith(shapes.PHRASES[o.position])
            others = set(words) - {"a", "shape", o.size, o.colour, o.shape, *shapes.PHRASES[o.position].split()}
            assert not others, (text, scene)  # never an attribute the object does not have
    assert all(0.4 < k / n < 0.6 for k in named.values()), (named, n)  # each kept with probability 1/2
    assert shapes.partial_caption(stream[0], np.random.default_rng(5)) == \
        shapes.partial_caption(stream[0], np.random.default_rng(5))


# -----------------------------------------------------------------------------
# scorer


def test_scorer_on_dataset_images(dataset_images):
    _, captions, images = dataset_images
    result = shapes.score(images, captions)
    assert all(result[k] >= 0.99 for k in ("shape", "colour", "position", "count", "mean")), result
    pil_images = [Image.fromarray(x) for x in images[:50]]
    assert shapes.score(pil_images, captions[:50]) == shapes.score(images[:50], captions[:50])
    # Mild blur and noise, as in generated samples.
    noisy = ndimage.gaussian_filter(images.astype(np.float32), (0, 0.6, 0.6, 0))
    noisy += np.random.default_rng(0).normal(0, 10, noisy.shape)
    result = shapes.score(np.clip(noisy, 0, 255).astype(np.uint8), captions)
    assert all(result[k] >= 0.97 for k in ("shape", "colour", "position")), result


def test_scorer_fails_on_wrong_images(dataset_images):
    _, captions, images = dataset_images
    shuffled = shapes.score(images, list(np.random.default_rng(0).permutation(captions)))
    assert shuffled["shape"] < 0.5 and shuffled["colour"] < 0.5 and shuffled["mean"] < 0.5, shuffled
    blank = shapes.score(np.zeros_like(images), captions)
    assert blank["mean"] == 0 and blank["count"] == 0
    noise = shapes.score(np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8), captions)
    assert noise["colour"] < 0.3 and noise["mean"] < 0.5, noise
    with pytest.raises(ValueError, match="uint8"):
        shapes.score(images.astype(np.float32), captions)


@pytest.mark.parametrize("attr", ["shape", "colour", "position"])
def test_scorer_blames_the_wrong_attribute(attr):
    # Draw each single-object caption with one attribute changed: only that attribute may score low.
    names = {"shape": shapes.SHAPES, "colour": list(shapes.COLOURS), "position": list(shapes.POSITIONS)}[attr]
    scenes = [s for s in (shapes.train_scene(5, i) for i in range(200)) if len(s) == 1][:60]
    wrong = [(s[0]._replace(**{attr: names[(names.index(getattr(s[0], attr)) + 1) % len(names)]}),) for s in scenes]
    result = shapes.score(np.stack([np.asarray(shapes.render(s)) for s in wrong]), [shapes.caption(s) for s in scenes])
    assert result[attr] == 0, result
    assert all(result[k] >= 0.99 for k in ("shape", "colour", "position") if k != attr), result

# -----------------------------------------------------------------------------
# built-in text encoder


def test_text_encoder():
    enc = shapes.BuiltinTextEncoder(dim=64, max_len=24)
    out = enc(["a small red circle on the left", "A SMALL RED CIRCLE, on the left!"])
    assert out.shape == (2, 24, 64) and out.dtype == torch.float32 and (enc.dim, enc.max_len) == (64, 24)
    assert torch.equal(out[0], out[1])  # lower-cased words; punctuation is not a token
    assert torch.equal(out, shapes.BuiltinTextEncoder(64, 24)(["a small red circle on the left"] * 2))
    assert torch.equal(out[0, 7:], enc.pad.expand(17, 64))  # 7 words, then padding
    # Word vectors are seeded by crc32 of the word (not hash(), which changes between processes), plus
    # a sinusoidal position code; padding is the vector of "<pad>".
    # plus the causal context: 0.7^k times the 'ctx:' vector of the word k + 1 places back
    vector = lambda word: np.random.RandomState(zlib.crc32(word)).standard_normal(64)
    assert np.allclose(out[0, 0] - enc.pos[0], vector(b"a"), atol=1e-6)
    assert np.allclose(out[0, 2] - enc.pos[2], vector(b"red") + vector(b"ctx:small") + 0.7 * vector(b"ctx:a"),
                       atol=1e-5)
    plain = shapes.BuiltinTextEncoder(64, 24, context=0.0)(["a small red circle on the left"])
    assert np.allclose(plain[0, 2] - enc.pos[2], vector(b"red"), atol=1e-6)
    # with the context, 'circle' says which colour came before it; without, the two captions' 'circle' tokens agree
    swap = ["a red circle and a blue square", "a blue circle and a red square"]
    assert not torch.equal(*enc(swap)[:, 2]) and torch.equal(*shapes.BuiltinTextEncoder(64, 24, 0.0)(swap)[:, 2])
    # bit for bit the float32 sums of the plain per-word loop (in this order): the dataset's bytes never change
    for text in ("a small red circle on the left", "a big blue square at the top and a red triangle"):
        words = text.split()
        ref = torch.stack([torch.from_numpy(vector(w.encode()).astype(np.float32)) for w in words]) + enc.pos[:len(words)]
        ctx = torch.zeros(64)
        for i, w in enumerate(words):
            ref[i] += ctx
            ctx = 0.7 * ctx + torch.from_numpy(vector(b"ctx:" + w.encode()).astype(np.float32))
        assert torch.equal(enc([text])[0, :len(words)], ref)
    assert text_encoder_from_spec({"type": "builtin", "dim": 64, "max_len": 24}).context == 0  # older specs
    assert text_encoder_from_spec(enc.spec).context == 0.7
    assert np.allclose(enc.pad, vector(b"<pad>"), atol=1e-6)
    angles = torch.arange(24.0)[:, None] / 1e4 ** (torch.arange(0, 64, 2) / 64)  # (L, D/2)
    assert torch.allclose(enc.pos, torch.stack([angles.sin(), angles.cos()], -1).flatten(1), atol=1e-5)
    assert not torch.equal(enc(["a red circle"]), enc(["a red square"]))
    long = " ".join(f"w{i}" for i in range(40))
    assert torch.equal(enc([long]), enc([" ".join(long.split()[:24])]))  # truncated to max_len words
    for bad in ["", "   ", "?!"]:
        with pytest.raises(ValueError, match=re.escape(f"caption 1 has no words: {bad!r}")):
            enc(["a red circle", bad])
