"""Tests of data.py: latent shards, the streaming reader (local and from a Hub dataset), and the shapes command."""
import json
import os
import re
import subprocess
import sys
import threading

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoint
import data
import shapes
from conftest import ROOT, hub_cache
from encoders import latent_to_image, latents_to_images, text_encoder_from_spec, vae_from_spec

# -----------------------------------------------------------------------------
# latent shards


def write_records(root, n, shard_size=4):
    """n records whose latent (2, 2, 2) and text (3, 4) are filled with the record number."""
    with data.ShardWriter(root, shard_size, {"what": "test"}) as w:
        for i in range(n):
            w.add(torch.full((2, 2, 2), i + 0.25), torch.full((3, 4), -i / 7), f"record {i}")
    return root


def test_shard_round_trip(tmp_path):
    root = write_records(str(tmp_path / "ds"), 10)
    index = json.load(open(os.path.join(root, "index.json")))
    assert index["count"] == 10 and [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert index["latent_shape"] == [2, 2, 2] and index["text_shape"] == [3, 4] and index["dtype"] == "float16"
    assert index["meta"] == {"what": "test"}
    assert sorted(os.listdir(root)) == ["index.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    with safe_open(os.path.join(root, "shard-00001.safetensors"), "pt") as f:  # the format, read directly
        assert f.get_tensor("latents").dtype == torch.float16 and f.get_tensor("text").shape == (4, 3, 4)
        assert json.loads(f.metadata()["captions"]) == [f"record {i}" for i in range(4, 8)]
    everything = data.load_all(root)
    ids = torch.arange(10.0)
    assert torch.equal(everything["latent"], (ids + 0.25).half().float()[:, None, None, None].expand(10, 2, 2, 2))
    assert torch.equal(everything["text"], (-ids / 7).half().float()[:, None, None].expand(10, 3, 4))
    assert everything["caption"] == [f"record {i}" for i in range(10)]


def test_shard_writer_errors(tmp_path):
    root = write_records(str(tmp_path / "ds"), 3)
    with pytest.raises(FileExistsError, match="ds"):
        data.ShardWriter(root, 4)
    with pytest.raises(ValueError, match="record 1"):
        with data.ShardWriter(str(tmp_path / "bad"), 4) as w:
            w.add(torch.zeros(2, 2, 2), torch.zeros(3, 4), "a")
            w.add(torch.zeros(2, 2, 3), torch.zeros(3, 4), "b")
    assert not os.path.exists(tmp_path / "bad" / "index.json")  # an interrupted write leaves no index


def damage(path, how):
    """Truncate a file, scribble over its header, or replace it by a valid shard of the wrong shape."""
    raw = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(raw[:-100])
    elif how == "corrupt":
        open(path, "wb").write(b"\xff" * 16 + raw[16:])
    else:
        save_file({"latents": torch.zeros(4, 2, 2, 3, dtype=torch.float16), "text": torch.zeros(4, 3, 4).half()},
                  path, metadata={"captions": json.dumps(["x"] * 4)})
        index = json.load(open(os.path.join(os.path.dirname(path), "index.json")))
        index["shards"][1]["bytes"] = os.path.getsize(path)  # so only the shapes are wrong
        json.dump(index, open(os.path.join(os.path.dirname(path), "index.json"), "w"))


@pytest.mark.parametrize("how, message", [("truncated", "292 bytes but index.json says 392"),
                                          ("corrupt", "unreadable"), ("wrong shape", r"latents is .* \[4, 2, 2, 3\]")])
def test_damaged_shard_is_named(tmp_path, how, message):
    root = write_records(str(tmp_path / "ds"), 10)
    path = os.path.join(root, "shard-00001.safetensors")
    damage(path, how)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: .*{message}"):
        data.load_all(root)


def test_missing_files_are_named(tmp_path):
    root = write_records(str(tmp_path / "ds"), 10)
    os.remove(os.path.join(root, "shard-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="shard-00002.safetensors"):
        data.load_all(root)
    open(os.path.join(root, "index.json"), "w").write("{not json")
    with pytest.raises(ValueError, match="index.json"):
        data.load_all(root)
    with pytest.raises(FileNotFoundError, match="index.json"):
        data.load_all(str(tmp_path))

# -----------------------------------------------------------------------------
# streaming reader


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory):
    """24 records in 6 shards of 4."""
    return write_records(str(tmp_path_factory.mktemp("stream") / "ds"), 24)


def ids(samples):
    """Record numbers of stream samples, read from their captions."""
    return [int(s["caption"].split()[1]) for s in samples]


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


def test_stream_yields_records(stream_root):
    sample = next(iter(data.ShardStream(stream_root)))
    i = ids([sample])[0]
    assert sample["latent"].dtype == torch.float32 and sample["latent"].shape == (2, 2, 2)
    assert torch.equal(sample["latent"], torch.full((2, 2, 2), i + 0.25).half().float())
    assert torch.equal(sample["text"], torch.full((3, 4), -i / 7).half().float())


def test_stream_ranks_split_each_epoch(stream_root):
    for world_size in (1, 2, 3):
        streams = [data.ShardStream(stream_root, seed=1, rank=r, world_size=world_size, shuffle_buffer=8)
                   for r in range(world_size)]
        for epoch in (0, 1):
            orders = [s.epoch_order(epoch) for s in streams]
            assert sorted(np.concatenate(orders)) == list(range(24))  # disjoint and covering
        for s in streams:  # the stream follows epoch after epoch, each reshuffled
            order = np.concatenate([s.epoch_order(e) for e in range(3)])
            assert ids(take(s, len(order))) == list(order)
            assert list(s.epoch_order(0)) != list(s.epoch_order(1))
    assert list(streams[0].epoch_order(0)) != list(data.ShardStream(stream_root, seed=2, rank=0, world_size=3,
                                                                    shuffle_buffer=8).epoch_order(0))


def test_stream_workers_split_each_epoch(stream_root):
    loader = torch.utils.data.DataLoader(data.ShardStream(stream_root, seed=4), batch_size=None, num_workers=2)
    assert sorted(ids(take(loader, 24))) == list(range(24))  # 3 shards per worker, so the first 24 are epoch 0


def test_stream_resume_equals_tail(stream_root):
    for rank, world_size in ((0, 1), (1, 2)):
        kw = dict(seed=3, rank=rank, world_size=world_size, shuffle_buffer=8)
        full = ids(take(data.ShardStream(stream_root, **kw), 80))
        for start in (1, 5, 8, 12, 37, 61):
            assert ids(take(data.ShardStream(stream_root, start=start, **kw), 80 - start)) == full[start:]


def test_stream_resume_with_workers(stream_root):
    def batches(start, n):
        loader = torch.utils.data.DataLoader(data.ShardStream(stream_root, seed=5, start=start, batch_size=4),
                                             batch_size=4, num_workers=2, collate_fn=ids)
        return take(loader, n)
    assert batches(12, 5) == batches(0, 8)[3:]
    with pytest.raises(ValueError, match="multiple of batch_size"):
        batches(5, 1)


@pytest.mark.slow
def test_stream_resume_reads_no_skipped_shard(tmp_path):
    root = write_records(str(tmp_path / "ds"), 24)
    stream = data.ShardStream(root, seed=6, shuffle_buffer=4, start=4)
    first_shard = stream.epoch_order(0)[0] // 4  # one shard per group: the first 4 samples come from it
    expected = ids(take(data.ShardStream(root, seed=6, shuffle_buffer=4), 8))[4:]
    damage(os.path.join(root, f"shard-{first_shard:05d}.safetensors"), "corrupt")
    assert ids(take(stream, 4)) == expected


def test_stream_too_few_shards(stream_root):
    with pytest.raises(ValueError, match="6 shards cannot feed 7 ranks"):
        next(iter(data.ShardStream(stream_root, rank=0, world_size=7)))

# -----------------------------------------------------------------------------
# streaming from a Hub dataset repo: huggingface_hub's cache laid out by hand, offline


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache in HF_HUB_OFFLINE mode (huggingface_hub reads both settings at call time)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_stream_from_hub_dataset(offline_hub, tmp_path, monkeypatch):
    root = write_records(str(tmp_path / "ds"), 24)
    hub_cache(offline_hub, "test/latents", root, repo_type="dataset", subdir="train")
    hub = "hf://datasets/test/latents/train"
    assert data.read_index(hub) == data.read_index(root)
    assert data.has_split("hf://datasets/test/latents", "train") and not data.has_split(hub, "val")
    real, fetched = checkpoint.hf_hub_download, []

    def download(*args, **kw):  # the real download, recorded
        fetched.append((kw["subfolder"], args[1], kw["repo_type"], threading.current_thread().name))
        return real(*args, **kw)
    monkeypatch.setattr(checkpoint, "hf_hub_download", download)
    hub_everything = data.load_all(hub)
    local_everything = data.load_all(root)
    assert all(torch.equal(hub_everything[k], local_everything[k]) for k in ("latent", "text"))
    assert hub_everything["caption"] == local_everything["caption"]
    assert {f[:3] for f in fetched} == {("train", f, "dataset") for f in ["index.json"] + sorted(os.listdir(root))[1:]}
    kw = dict(seed=3, shuffle_buffer=8)  # groups of 2 shards (8 records)
    assert ids(take(data.ShardStream(hub, **kw), 50)) == ids(take(data.ShardStream(root, **kw), 50))
    # Each shard is fetched when its group is next but one: while the first group is read, the second group's
    # shards are downloaded in the background, and no other shard is.
    stream, second_fetched = data.ShardStream(hub, **kw), threading.Event()
    first, second = ({f"shard-{s:05d}.safetensors" for s in stream.epoch_order(0)[a:a + 8] // 4} for a in (0, 8))
    fetched.clear()

    def download_and_tell(*args, **kw):
        path = download(*args, **kw)
        if second <= {f[1] for f in fetched}:
            second_fetched.set()
        return path
    monkeypatch.setattr(checkpoint, "hf_hub_download", download_and_tell)
    it = iter(stream)
    next(it)  # one record of the first group taken, 7 left
    assert second_fetched.wait(timeout=60)
    assert {f[1] for f in fetched} == first | second
    assert all(f[3] != threading.main_thread().name for f in fetched if f[1] in second)


def test_hub_errors(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"hf://datasets/test/absent/index.json: no such file.*HF_HUB_OFFLINE"):
        data.read_index("hf://datasets/test/absent")
    for bad in ("hf://test/latents", "hf://datasets/test", "hf://datasets//x"):
        with pytest.raises(ValueError, match="expected a local folder or hf://datasets/USER/NAME"):
            data.read_index(bad)
    assert checkpoint.parse_hub_root("hf://datasets/u/n@v1.0/a/b") == ("u/n", "v1.0", "a/b")
    assert checkpoint.parse_hub_root("hf://datasets/u/n/") == ("u/n", None, None)

# -----------------------------------------------------------------------------
# the shapes command


@pytest.mark.slow
def test_shapes_command(tmp_path):
    out = str(tmp_path / "shapes")
    subprocess.run([sys.executable, "data.py", "shapes", "--out", out, "--n", "300", "--val", "40",
                    "--shard-size", "128", "--seed", "2"], cwd=ROOT, check=True, capture_output=True)
    index = data.read_index(out)
    assert index["count"] == 300 and [s["count"] for s in index["shards"]] == [128, 128, 44]
    assert index["latent_shape"] == [3, 32, 32] and index["text_shape"] == [24, 64]
    train, val = data.load_all(out), data.load_all(os.path.join(out, "val"))
    assert train["caption"] == [shapes.caption(shapes.train_scene(2, i)) for i in range(300)]
    assert val["caption"] == shapes.heldout_captions(40, seed=2)
    assert train["latent"].min() == -1 and train["latent"].max() <= 1
    assert torch.equal(train["text"], shapes.BuiltinTextEncoder(64, 24)(train["caption"]).half().float())
    result = shapes.score(latent_to_image(val["latent"]), val["caption"])
    assert result["mean"] >= 0.99, result
    # Asking again for the same dataset reuses it; asking for another one in the same place is an error.
    mtime = os.path.getmtime(os.path.join(out, "index.json"))
    data.make_shapes_dataset(out, 300, seed=2, shard_size=128, val=40)
    assert os.path.getmtime(os.path.join(out, "index.json")) == mtime
    with pytest.raises(ValueError, match="holds a different dataset"):
        data.make_shapes_dataset(out, 500, seed=2, shard_size=128, val=40)


def test_shapes_dataset_options_fewer_scenes_and_partial_captions(tmp_path):
    full = data.load_all(data.make_shapes_dataset(str(tmp_path / "full"), 60, res=16, seed=4, val=8))
    few = str(tmp_path / "few")
    data.make_shapes_dataset(few, 60, res=16, seed=4, val=8, scenes=7)
    train = data.load_all(few)
    pool = shapes.distinct_scenes(4, 7)
    assert train["caption"] == [shapes.caption(pool[i % 7]) for i in range(60)] and len(set(train["caption"])) == 7
    assert torch.equal(train["latent"][7], train["latent"][0]) and not torch.equal(train["latent"][1], train["latent"][0])
    assert data.load_all(os.path.join(few, "val"))["caption"] == shapes.heldout_captions(8, seed=4)
    part = data.load_all(data.make_shapes_dataset(str(tmp_path / "part"), 60, res=16, seed=4, val=8,
                                                  captions="partial"))
    assert torch.equal(part["latent"], full["latent"])  # the same images ...
    assert part["caption"] == [shapes.partial_caption(shapes.train_scene(4, i), np.random.default_rng([4, i, 1]))
                               for i in range(60)] != full["caption"]  # ... named in part, deterministically
    assert torch.equal(part["text"], shapes.BuiltinTextEncoder(64, 24)(part["caption"]).half().float())
    assert data.load_all(str(tmp_path / "part" / "val"))["caption"] == shapes.heldout_captions(8, seed=4)  # full
    meta = data.read_index(str(tmp_path / "part"))["meta"]
    assert meta["captions"] == "partial" and "scenes" not in meta and "captions" not in data.read_index(
        str(tmp_path / "full"))["meta"]  # the defaults leave the meta of older datasets unchanged
    with pytest.raises(ValueError, match="holds a different dataset"):
        data.make_shapes_dataset(few, 60, res=16, seed=4, val=8, scenes=8)
    with pytest.raises(ValueError, match="captions 'full' or 'partial'"):
        data.make_shapes_dataset(str(tmp_path / "x"), 60, captions="some")


def test_shapes_repeated_scenes_are_drawn_and_encoded_once_with_the_same_bytes(tmp_path, monkeypatch):
    drawn, render = [], shapes.render
    monkeypatch.setattr(shapes, "render", lambda scene, res: drawn.append(scene) or render(scene, res))
    out = str(tmp_path / "few")
    data.make_shapes_dataset(out, 60, res=16, val=0, text_dim=16, max_len=12, scenes=8)
    assert len(drawn) == len(set(drawn)) == 8  # 60 images of 8 scenes: each drawn once
    pool, everything = shapes.distinct_scenes(0, 8), data.load_all(out)
    images = latents_to_images(everything["latent"], {"type": "pixels"})
    assert all(np.array_equal(im, np.asarray(render(pool[i % 8], 16))) for i, im in enumerate(images))
    enc = shapes.BuiltinTextEncoder(16, 12)  # each record's features: its caption encoded alone
    assert torch.equal(torch.cat([enc([c]) for c in everything["caption"]]).half().float(), everything["text"])


def test_memo_computes_each_new_key_once_and_keeps_at_most_limit():
    calls = []
    compute = lambda keys: calls.append(list(keys)) or [k * 10 for k in keys]
    cache = {}
    assert data._memo(cache, [1, 2, 1, 3], compute, limit=2) == [10, 20, 10, 30]
    assert calls == [[1, 2, 3]] and cache == {1: 10, 2: 20}
    assert data._memo(cache, [3, 1, 3], compute, limit=2) == [30, 10, 30] and calls[1:] == [[3]]


def test_shapes_meta_names_its_encoders_and_old_versions_are_rewritten(tmp_path, capsys):
    out = str(tmp_path / "shapes")
    data.make_shapes_dataset(out, 20, res=16, val=8, text_dim=16, max_len=12)
    meta = data.read_index(out)["meta"]
    assert meta["text_encoder"] == {"type": "builtin", "dim": 16, "max_len": 12, "context": 0.7}
    assert meta["latents"] == {"type": "pixels"}
    assert (meta["text_dim"], meta["max_len"], meta["latent"]) == (16, 12, "pixels")  # kept for older readers
    everything = data.load_all(out)
    assert torch.equal(text_encoder_from_spec(meta["text_encoder"])(everything["caption"]).half().float(),
                       everything["text"])
    images = latents_to_images(everything["latent"][:5], meta["latents"])
    assert all(np.array_equal(im, np.asarray(shapes.render(shapes.train_scene(0, i), 16))) for i, im in enumerate(images))
    plain = str(tmp_path / "plain")  # without the causal context: the same images, the older encoder's features
    data.make_shapes_dataset(plain, 20, res=16, val=8, text_dim=16, max_len=12, context=0.0)
    assert data.read_index(plain)["meta"]["text_encoder"]["context"] == 0.0
    without = shapes.BuiltinTextEncoder(16, 12, 0.0)(everything["caption"]).half().float()
    assert torch.equal(data.load_all(plain)["text"], without) and not torch.equal(without, everything["text"])
    assert vae_from_spec(meta["latents"]) is None
    # A dataset written by an older data.py (here: without the encoder specs) for the same request is rewritten
    index_path = os.path.join(out, "index.json")
    index = json.load(open(index_path))
    for key in ("text_encoder", "latents"):
        del index["meta"][key]
    json.dump(index, open(index_path, "w"))
    capsys.readouterr()
    data.make_shapes_dataset(out, 20, res=16, val=8, text_dim=16, max_len=12)
    assert "rewriting the shapes dataset, written by another version of data.py (changed: ['latents', " \
           "'text_encoder'])" in capsys.readouterr().out
    assert data.read_index(out)["meta"] == meta and data.read_index(os.path.join(out, "val"))["meta"]["latents"]
    assert data.load_all(out)["caption"] == everything["caption"]
    with pytest.raises(ValueError, match="unknown text encoder spec"):
        text_encoder_from_spec({"type": "t5"})
