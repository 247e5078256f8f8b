"""
Data as training reads it: latent shards (fp16 latents and caption features in safetensors files, with an
index.json), a shuffled stream over them that splits across ranks and workers and resumes at any sample
(local, or from a Hugging Face Hub dataset), and the two ways of writing them:

    python data.py shapes --out data_cache/shapes32 --n 40000    # the built-in dataset (shapes.py)
    python data.py prepare --input images/ --out data_cache/latents --res 256 512   # real image-caption pairs
"""
import argparse
import collections
import csv
import json
import math
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import shapes
from checkpoint import atomic_write, hub_file, offline_hint, parse_hub_root, read_json, write_json
from config import UsageError
from encoders import DFN5B_CLIP, PIXELS, SDXL_VAE, check_hub, load_text_encoder, load_vae

# -----------------------------------------------------------------------------
# Latent shards. A dataset is a folder with index.json and shard-00000.safetensors, ...; each shard
# holds 'latents' (N, C, H, W) fp16, 'text' (N, L, D) fp16 and its captions as a JSON list in the
# safetensors metadata under 'captions'. index.json lists every shard with its record count and
# byte size, so a truncated or swapped file is caught before it is read. The same layout in a Hub
# dataset repo is read as hf://datasets/USER/NAME[@REVISION][/SUBDIR], one file at a time.

FORMAT = "latent-shards"
VERSION = 1


def shard_name(k):
    return f"shard-{k:05d}.safetensors"


def _save_shard(path, latents, text, captions):
    """Write one shard file atomically; returns its index entry {'file', 'count', 'bytes'}."""
    with atomic_write(path) as tmp:
        save_file({"latents": latents.half().contiguous(), "text": text.half().contiguous()}, tmp,
                  metadata={"captions": json.dumps(list(captions))})
        os.chmod(tmp, 0o644)  # safetensors creates files only their owner can read
    return {"file": os.path.basename(path), "count": len(captions), "bytes": os.path.getsize(path)}


def _write_index(out_dir, shards, shard_size, latent_shape, text_shape, meta):
    """Write index.json last and atomically: until it exists, the folder is not a dataset."""
    index = {"format": FORMAT, "version": VERSION, "count": sum(s["count"] for s in shards),
             "shard_size": shard_size, "latent_shape": list(latent_shape), "text_shape": list(text_shape),
             "dtype": "float16", "meta": meta, "shards": shards}
    write_json(os.path.join(out_dir, "index.json"), index, indent=1)


class ShardWriter:
    """Write (latent, text, caption) records into fixed-size shards, then index.json last."""

    def __init__(self, out_dir, shard_size=4096, meta=None):
        if os.path.exists(os.path.join(out_dir, "index.json")):
            raise FileExistsError(f"{out_dir} already holds a dataset (index.json); "
                                  f"delete it or write elsewhere")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.meta = meta or {}
        self.shards = []  # the index entries of the shards written so far
        self.buf = []  # records not yet in a shard
        self.shapes = None  # (latent shape, text shape) of the first record: every record must match it
        self.count = 0  # records added

    def add(self, latent, text, caption):
        latent = torch.as_tensor(latent).to(torch.float16)
        text = torch.as_tensor(text).to(torch.float16)
        shapes = (list(latent.shape), list(text.shape))
        self.shapes = self.shapes or shapes
        if shapes != self.shapes or not isinstance(caption, str):
            raise ValueError(f"ShardWriter({self.out_dir}): record {self.count} has latent/text shapes "
                             f"{shapes} and caption {caption!r}; expected {self.shapes} and a string")
        self.buf.append((latent, text, caption))
        self.count += 1
        if len(self.buf) == self.shard_size:
            self._flush()

    def _flush(self):
        latents, text, captions = zip(*self.buf)
        path = os.path.join(self.out_dir, shard_name(len(self.shards)))
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
        # on an error no index.json is written, so the folder is not mistaken for a dataset
        if exc_type is None:
            self.close()


def resolve_file(root, name):
    """Local path of file `name` of the dataset at `root`, a folder or a Hub dataset
    (downloaded once, then cached)."""
    if root.startswith("hf://"):
        repo, revision, subdir = parse_hub_root(root)
        path = hub_file(repo, name, subdir, repo_type="dataset", revision=revision)
        if path:
            return path
        raise FileNotFoundError(f"{root}/{name}: no such file in the Hub dataset{offline_hint()}")
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
    index = read_json(path)
    try:
        fields = [index[k] for k in ("format", "version", "shard_size", "latent_shape", "text_shape",
                                     "shards")]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid index ({type(e).__name__}: {e})") from e
    if fields[:2] != [FORMAT, VERSION]:
        raise ValueError(f"{path}: format {fields[0]!r} v{fields[1]}, expected {FORMAT!r} v{VERSION}")
    return index


def check_shards(root, index):
    """Every shard of a local dataset is there with the size index.json records: a missing or truncated shard
    is found when training starts, not when the stream reaches it (Hub shards are checked as they arrive)."""
    if root.startswith("hf://"):
        return
    for entry in index["shards"]:
        path = os.path.join(root, entry["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (index.json lists it)")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise ValueError(f"{path}: {size} bytes but index.json says {entry['bytes']} "
                             f"(truncated or replaced?)")


def read_shard(root, index, i, path=None):
    """Shard i of a dataset as (latents fp16 (N,C,H,W), text fp16 (N,L,D), captions),
    checked against the index."""
    entry = index["shards"][i]
    n = entry["count"]
    if not path:  # given when the stream has already fetched the file
        path = resolve_file(root, entry["file"])
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ValueError(f"{path}: {size} bytes but index.json says {entry['bytes']} "
                         f"(truncated or replaced?)")
    try:
        with safe_open(path, "pt") as f:
            latents, text = f.get_tensor("latents"), f.get_tensor("text")
            captions = json.loads(f.metadata()["captions"])
    except Exception as e:  # safetensors raises its own error types for a corrupt header or data
        raise ValueError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
    for key, t, shape in (("latents", latents, index["latent_shape"]), ("text", text, index["text_shape"])):
        if t.dtype != torch.float16 or list(t.shape) != [n] + shape:
            raise ValueError(f"{path}: {key} is {t.dtype} {list(t.shape)}, "
                             f"index.json says float16 {[n] + shape}")
    if len(captions) != n or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{path}: {len(captions)} captions for {n} records")
    return latents, text, captions


def load_all(root):
    """A whole (small) dataset in memory: {'latent': (N,C,H,W), 'text': (N,L,D) float32, 'caption': list}."""
    index = read_index(root)
    shards = [read_shard(root, index, i) for i in range(len(index["shards"]))]
    latents, text, captions = zip(*shards)
    return {"latent": torch.cat(latents).float(), "text": torch.cat(text).float(),
            "caption": sum(captions, [])}

# -----------------------------------------------------------------------------
# Streaming reader. Epoch e: shards are permuted by (seed, e), dealt to ranks, then to DataLoader
# workers; each worker reads its shards in groups of shuffle_buffer records (rounded up to whole
# shards) and yields each group's records in a random order. The order is a pure function of
# (seed, epoch, rank, world_size, worker, num_workers) computed from shard counts alone, so resuming
# at `start` skips whole epochs and groups without reading them. Since the reading order is known in
# advance, a background thread fetches the next `prefetch` groups (from the Hub: download into the HF
# cache) while the current one is consumed.


def _prefetched(pool, fn, items, ahead):
    """(item, fn(item)) for each item in order, with fn running in `pool` up to `ahead` items
    before it is needed."""
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
    """Endless shuffled stream of {'latent': (C,H,W), 'text': (L,D) float32, 'caption': str}
    from a folder or Hub."""

    def __init__(self, root, seed=0, rank=0, world_size=1, shuffle_buffer=8192, start=0, batch_size=1,
                 prefetch=1):
        self.root = root
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start  # samples of this rank's stream already consumed: a resumed run skips them
        self.batch_size = batch_size  # the DataLoader's, to split `start` by worker
        self.prefetch = prefetch  # groups of shards fetched ahead of the one being read
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} is not in [0, world_size={world_size})")
        self.index = read_index(root)
        counts = [s["count"] for s in self.index["shards"]]
        self.counts = np.array(counts)  # records per shard
        self.offsets = np.cumsum([0] + counts)  # the global id of each shard's first record
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
        """Global record ids (position in the dataset) in the order this rank's worker yields them
        in `epoch`."""
        record_ids = []
        for ids, order in self._groups(epoch, worker, num_workers):
            group = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in ids])
            record_ids.append(group[order])
        return np.concatenate(record_ids)

    def _reads(self, worker, num_workers, skip):
        """(shard ids, order of the records still to yield) of every group this worker reads,
        epoch after epoch."""
        epoch = 0
        while True:
            n = self.counts[self._shards(epoch, worker, num_workers)].sum()  # records of this epoch
            if skip >= n:  # the whole epoch is skipped, without computing its groups
                skip -= n
                epoch += 1
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
        worker, num_workers = 0, 1  # no worker processes: the stream is read in the main process
        if info:
            worker, num_workers = info.id, info.num_workers
        if len(self.counts) < self.world_size * num_workers:
            raise ValueError(f"{self.root}: {len(self.counts)} shards cannot feed {self.world_size} ranks x "
                             f"{num_workers} workers; write smaller shards or use fewer workers")
        skip = self.start  # samples of this worker's stream to pass over
        if num_workers > 1:
            if self.start % self.batch_size:
                raise ValueError(f"ShardStream: start={self.start} is not a multiple of "
                                 f"batch_size={self.batch_size}")
            # The DataLoader takes whole batches from its workers in turn and, after a restart, begins again
            # at worker 0; so worker w takes over the part of the worker that was due `extra` turns later.
            rounds, extra = divmod(self.start // self.batch_size, num_workers)
            worker = (worker + extra) % num_workers
            turns = rounds  # the batches the DataLoader took from that worker
            if worker < extra:
                turns += 1
            skip = turns * self.batch_size
        pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        try:
            reads = self._reads(worker, num_workers, skip)
            for (ids, order), paths in _prefetched(pool, self._fetch, reads, self.prefetch):
                shards = [read_shard(self.root, self.index, int(s), path) for s, path in zip(ids, paths)]
                latents, text, captions = zip(*shards)  # one tuple entry per shard of the group
                latents = torch.cat(latents)  # (N, C, H, W)
                text = torch.cat(text)  # (N, L, D)
                captions = sum(captions, [])
                for j in order:
                    yield {"latent": latents[j].float(), "text": text[j].float(), "caption": captions[j]}
        finally:
            # a stream dropped by its reader stops fetching; a download under way finishes in the background
            pool.shutdown(wait=False, cancel_futures=True)

# -----------------------------------------------------------------------------
# Preparing real data, as the official micro_diffusion/datasets/prepare/ scripts do: image-caption pairs ->
# resize the short side (bicubic), centre-crop, encode with the frozen VAE (posterior sample x scaling
# factor) and text encoder, store fp16. One shard dataset per resolution, OUT/<res>/. Input pair i always
# lands in shard i // shard_size and its posterior noise is drawn from its own stream (seed, i, res), so
# each shard is a pure function of its inputs: a rerun skips the shards OUT/prepare.json records as
# finished and recomputes the rest, and an interrupted run followed by a rerun writes the same bytes as one
# uninterrupted run. Pairs that cannot be used (unreadable image, missing or empty caption) are skipped and
# listed in OUT/report.json.

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Pair(NamedTuple):
    image: str  # path of the image file
    caption: str  # the caption; None when it is in caption_file
    caption_file: str  # the same-name .txt beside the image (folder input), else None


def list_pairs(src):
    """Image-caption pairs of a folder (images with same-name .txt captions) or of a .jsonl/.csv
    (path, caption)."""
    if os.path.isdir(src):  # every image in the tree, in sorted order
        pairs = []
        for folder, dirs, files in os.walk(src):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    caption_file = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
                    pairs.append(Pair(os.path.join(folder, f), None, caption_file))
        return pairs
    if not os.path.isfile(src):
        raise UsageError(f"{src}: no such folder or file")
    if src.endswith(".jsonl"):
        rows = []
        with open(src, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():  # blank lines are allowed
                    continue
                try:
                    rows.append((n, json.loads(line)))
                except ValueError as e:
                    raise ValueError(f"{src}:{n}: not JSON ({e})") from None
    elif src.endswith(".csv"):
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(enumerate(csv.DictReader(f), 2))  # line 1 is the header
    else:
        raise UsageError(f"{src}: expected a folder of images with .txt captions, or a .jsonl or .csv file")
    base = os.path.dirname(os.path.abspath(src))
    pairs = []
    for n, row in rows:  # image paths are relative to the list's folder
        if not (isinstance(row, dict) and isinstance(row.get("path"), str)
                and isinstance(row.get("caption", 0), str)):
            raise ValueError(f"{src}:{n}: expected string fields 'path' and 'caption', got {str(row)[:100]}")
        pairs.append(Pair(os.path.join(base, row["path"]), row["caption"], None))
    return pairs


def resize_center_crop(img, res):
    """PIL image -> uint8 (res, res, 3): short side resized to res (bicubic), then the centre
    cropped, as micro_diffusion/datasets/prepare/*/base.py do."""
    w, h = img.size
    short = min(w, h)
    w2 = max(res, round(w * res / short))  # max(): rounding never leaves a side below res
    h2 = max(res, round(h * res / short))
    left, top = (w2 - res) // 2, (h2 - res) // 2
    return np.asarray(img.resize((w2, h2), Image.BICUBIC).crop((left, top, left + res, top + res)))


def load_pair(pair, resolutions):
    """(list of uint8 (res, res, 3) images, caption), or (None, (reason, detail)) for a pair
    that is skipped."""
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
    except Exception as e:
        # Pillow raises OSError, SyntaxError, ValueError, ... for broken files: all are reported
        return None, ("unreadable image", f"{type(e).__name__}: {e}")
    return [resize_center_crop(img, r) for r in resolutions], caption.strip()


def posterior_noise(vae, ids, res, seed):
    """The posterior noise (B, C, res/f, res/f) of inputs `ids`: each from its own stream,
    so no batch matters."""
    shape = (vae.latent_channels, res // vae.downsample_factor, res // vae.downsample_factor)
    noise = [np.random.default_rng([seed, i, res]).standard_normal(shape, np.float32) for i in ids]
    return torch.from_numpy(np.stack(noise))


@torch.no_grad()
def encode_batch(vae, enc, ids, images, captions, resolutions, seed=0, sample=True):
    """Loaded pairs -> ({res: latents (B, C, res/f, res/f)}, caption features (B, L, D)), fp16 on the CPU."""
    device = vae.encoder.conv_in.weight.device
    latents = {}
    for j, r in enumerate(resolutions):
        x = shapes.image_to_latent(np.stack([im[j] for im in images])).to(device)  # (B, 3, r, r) in [-1, 1]
        noise = posterior_noise(vae, ids, r, seed).to(device) if sample else None
        latents[r] = vae.encode(x, sample=sample, noise=noise).half().cpu()
    return latents, enc(list(captions)).half().cpu()


def _shard_finished(state, dirs, k):
    """Shard k is recorded in prepare.json, and each of its files is there with the recorded size."""
    entry = state["shards"].get(str(k))
    if entry is None:
        return False
    for r, size in entry["bytes"].items():
        path = os.path.join(dirs[int(r)], shard_name(k))
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return False
    return True


def _encode_chunk(loaded, n, names, vae, enc, resolutions, batch_size, seed, sample, bar):
    """Encode the n loaded pairs of one shard, `loaded` yielding (i, load_pair's result) in order, a batch
    at a time: ({res: [latents of each batch]}, [caption features of each batch], captions, skipped pairs)."""
    latents = {r: [] for r in resolutions}
    text = []
    captions = []
    skipped = []
    batch = []  # loaded pairs waiting for the encoders: (i, images, caption)
    for count, (i, (images, info)) in enumerate(loaded, 1):
        if images is None:  # info: (reason, detail)
            skipped.append({"path": names[i], "reason": info[0], "detail": info[1]})
        else:  # info: the caption
            batch.append((i, images, info))
        if batch and (len(batch) == batch_size or count == n):
            ids, images, texts = zip(*batch)
            z, y = encode_batch(vae, enc, ids, images, texts, resolutions, seed, sample)
            for r in resolutions:
                latents[r].append(z[r])
            text.append(y)
            captions.extend(texts)
            batch = []
        bar.update()
    return latents, text, captions, skipped


def prepare(src, out, resolutions=(256, 512), vae=SDXL_VAE, vae_subfolder="vae", text_encoder=DFN5B_CLIP,
            text_encoder_subfolder=None, batch_size=32, device="cpu", shard_size=1024, seed=0, sample=True,
            workers=8):
    """Encode the image-caption pairs of `src` into a shard dataset OUT/<res>/ per resolution;
    returns the report."""
    t0 = time.time()
    pairs = list_pairs(src)
    if not pairs:
        raise UsageError(f"{src}: no image-caption pairs found (images: {', '.join(IMAGE_EXTS)})")
    check_hub(vae, "--vae PATH")  # at once, not after a minute of retries, if the Hub cannot be reached
    check_hub(text_encoder, "--text-encoder PATH")
    vae = load_vae(vae, vae_subfolder, device)
    enc = load_text_encoder(text_encoder, text_encoder_subfolder, device)
    f = vae.downsample_factor
    bad = [r for r in resolutions if r % f]
    if bad:
        raise UsageError(f"--res {bad}: not multiples of the VAE's downsampling factor {f}")
    base = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    names = [os.path.relpath(p.image, base) for p in pairs]  # as the report lists them
    settings = {"source": os.path.abspath(src), "pairs": len(pairs), "resolutions": list(resolutions),
                "pairs_crc32": zlib.crc32(json.dumps([names, [p.caption for p in pairs]]).encode()),
                "shard_size": shard_size, "seed": seed, "posterior": "sample" if sample else "mean",
                "text_encoder": enc.spec, "latents": vae.spec}
    state_path = os.path.join(out, "prepare.json")
    dirs = {r: os.path.join(out, str(r)) for r in resolutions}
    state = {"settings": settings, "shards": {}}  # "shards": {k: the entry of shard k, once it is written}
    if os.path.exists(state_path):  # a rerun
        state = read_json(state_path)
    if state["settings"] != settings:
        diff = {k: (state["settings"].get(k), v) for k, v in settings.items()
                if state["settings"].get(k) != v}
        raise UsageError(f"{out} holds shards prepared from other inputs or settings (then, now): {diff}; "
                         f"delete it or prepare into another folder")
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    def load(i):  # runs in the pool's threads: decoding images is the slow part on CPU
        return load_pair(pairs[i], resolutions)

    # chunks of input pairs: one per shard
    chunks = [range(a, min(a + shard_size, len(pairs))) for a in range(0, len(pairs), shard_size)]
    todo = [k for k in range(len(chunks)) if not _shard_finished(state, dirs, k)]
    done = len(pairs) - sum(len(chunks[k]) for k in todo)
    t1 = time.time()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(pairs), initial=done, desc="prepare",
                                                   unit="img") as bar:
        for k in todo:
            loaded = _prefetched(pool, load, chunks[k], 2 * batch_size)  # (i, load(i)) in order
            latents, text, captions, skipped = _encode_chunk(loaded, len(chunks[k]), names, vae, enc,
                                                             resolutions, batch_size, seed, sample, bar)
            entry = {"count": len(captions), "bytes": {}, "skipped": skipped}
            if captions:  # a shard whose every pair was skipped has no file
                for r in resolutions:
                    path = os.path.join(dirs[r], shard_name(k))
                    saved = _save_shard(path, torch.cat(latents[r]), torch.cat(text), captions)
                    entry["bytes"][str(r)] = saved["bytes"]
            state["shards"][str(k)] = entry  # recorded only once all its files are written
            write_json(state_path, state, indent=1)

    entries = [state["shards"][str(k)] for k in range(len(chunks))]
    for r in resolutions:
        # the last three (text_dim, max_len, latent) as in the shapes meta
        meta = {"dataset": "prepared", "source": settings["source"], "res": r, "seed": seed,
                "posterior": settings["posterior"], "text_encoder": enc.spec, "latents": vae.spec,
                "text_dim": enc.dim, "max_len": enc.max_len, "latent": "vae"}
        shards = [{"file": shard_name(k), "count": e["count"], "bytes": e["bytes"][str(r)]}
                  for k, e in enumerate(entries) if e["count"]]
        if shards:
            _write_index(dirs[r], shards, shard_size, (vae.latent_channels, r // f, r // f),
                         (enc.max_len, enc.dim), meta)
    skipped = [s for e in entries for s in e["skipped"]]
    seconds = time.time() - t0
    written = sum(e["count"] for e in entries)
    encoded = sum(state["shards"][str(k)]["count"] for k in todo)  # by this run, not counting its skipped
    # pairs_per_s counts from t1: without loading the encoders
    report = {"source": settings["source"], "pairs": len(pairs), "written": written, "skipped": len(skipped),
              "reasons": dict(collections.Counter(s["reason"] for s in skipped)),
              "datasets": list(dirs.values()), "shards": len(chunks),
              "shards_already_done": len(chunks) - len(todo), "seconds": round(seconds, 2),
              "pairs_per_s": round(encoded / (time.time() - t1), 2), "skipped_pairs": skipped}
    write_json(os.path.join(out, "report.json"), report, indent=1)
    reasons = ", ".join(f"{v} {k}" for k, v in report["reasons"].items()) or "none"
    print(f"prepare: {written} of {len(pairs)} pairs -> {', '.join(dirs.values())}; skipped {len(skipped)} "
          f"({reasons}); {len(chunks) - len(todo)} of {len(chunks)} shards were already done; "
          f"{encoded} pairs encoded ({report['pairs_per_s']:.0f}/s), {seconds:.1f}s in all")
    if skipped:  # the first few by name: the rest, and every error message, are in report.json
        names = ", ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"prepare: skipped {names}{more}; all {len(skipped)}, with their errors, in {out}/report.json")
    if not written:
        raise ValueError(f"{src}: none of the {len(pairs)} pairs could be used; see {out}/report.json")
    return report

# -----------------------------------------------------------------------------
# Writing the shapes dataset, and the command line.


def _write_shapes(out, scenes, res, enc, shard_size, meta, desc, texts=None):
    """Render scenes and write them, captioned (by `texts`, or in full), as shards to `out`, with a progress
    bar. A scene (or caption) met before is not drawn (or encoded) again: 40,000 training images hold about
    7,100 distinct scenes. The same bytes, 2-3x faster."""
    drawn = {}  # scene -> image
    encoded = {}  # caption -> features
    memo_bytes = 2**28  # up to 256 MiB of each

    def draw(todo):
        return [np.asarray(shapes.render(s, res)) for s in todo]

    def encode(todo):  # (L, D) each, copied: a view would keep the whole batch's features alive in the memo
        return [row.clone() for row in enc(todo).to(torch.float16)]

    with ShardWriter(out, shard_size, meta) as writer, tqdm(total=len(scenes), desc=desc, unit="img") as bar:
        for b in range(0, len(scenes), 1024):  # encode captions a batch at a time
            chunk = scenes[b : b + 1024]
            if texts:
                chunk_texts = texts[b : b + 1024]
            else:
                chunk_texts = [shapes.caption(s) for s in chunk]
            images = _memo(drawn, chunk, draw, memo_bytes // (res * res * 3))
            feats = _memo(encoded, chunk_texts, encode, memo_bytes // (enc.max_len * enc.dim * 4))
            latents = shapes.image_to_latent(np.stack(images)).to(torch.float16)  # (B, 3, H, W), as stored
            for latent, feat, text in zip(latents, feats, chunk_texts):
                writer.add(latent, feat, text)
            bar.update(len(chunk))


def _memo(cache, keys, compute, limit):
    """[compute([k])[0] for k in keys], computing each key not in `cache` once, in one compute(todo) call;
    `cache` keeps up to `limit` entries."""
    todo = [k for k in dict.fromkeys(keys) if k not in cache]
    new = dict(zip(todo, compute(todo))) if todo else {}
    values = [cache[k] if k in cache else new[k] for k in keys]
    room = max(0, limit - len(cache))
    cache.update(list(new.items())[:room])  # once full, the cache keeps what it has
    return values


def make_shapes_dataset(out, n, res=32, seed=0, shard_size=4096, text_dim=64, max_len=24, val=512,
                        context=0.7, scenes=0, captions="full"):
    """Write the shapes dataset (n train images in out/, `val` held-out ones in out/val/) unless it exists.
    scenes > 0: the training images cycle through that many distinct scenes (else each is a fresh draw);
    captions "partial": each training caption names a random part of the attributes (the held-out split's
    captions stay full)."""
    # below 16px the scorer cannot tell shapes apart, but 8px images still serve the fast plumbing tests
    if n < 1 or res < 8 or scenes < 0 or captions not in ("full", "partial"):
        raise UsageError(f"make_shapes_dataset: need n >= 1, res >= 8, scenes >= 0, captions 'full' or "
                         f"'partial'; got n={n}, res={res}, scenes={scenes}, captions={captions!r}")
    enc = shapes.BuiltinTextEncoder(text_dim, max_len, context)
    scenes_id = zlib.crc32(json.dumps([shapes.COLOURS, shapes.POSITIONS, shapes.SIZES, shapes.GAP,
                                       shapes.SUPERSAMPLE, shapes.HELDOUT_EVERY]).encode())
    request = {"dataset": "shapes", "n": n, "res": res, "seed": seed, "val": val, "text_dim": text_dim,
               "max_len": max_len}
    if scenes:  # recorded only when not the default, so the datasets written before these options still match
        request["scenes"] = scenes
    if captions != "full":
        request["captions"] = captions
    meta = {**request, "latent": "pixels", "encoder": enc.name, "scenes_id": scenes_id,
            "text_encoder": enc.spec, "latents": PIXELS}
    if os.path.exists(os.path.join(out, "index.json")):  # written last, so the dataset is complete
        old = read_index(out)["meta"]
        if old == meta:
            print(f"{out}: using the shapes dataset already there")
            return out
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        if any(old.get(k) != v for k, v in request.items()):
            raise UsageError(f"{out} holds a different dataset (existing, requested): {diff}; "
                             f"delete it or pick another folder")
        # The same request written by another version of this file: the dataset is a pure function of the
        # request and the code, so it is safe to write it again (a data_cache folder simply follows the code).
        print(f"{out}: rewriting the shapes dataset, written by another version of data.py "
              f"(changed: {sorted(diff)})")
        os.remove(os.path.join(out, "index.json"))
    t0 = time.time()
    if val:
        val_dir = os.path.join(out, "val")
        # an index.json already there: left by an interrupted run, or an older version
        if os.path.exists(os.path.join(val_dir, "index.json")):
            os.remove(os.path.join(val_dir, "index.json"))
        heldout = [shapes.parse_caption(c) for c in shapes.heldout_captions(val, seed)]
        _write_shapes(val_dir, heldout, res, enc, shard_size, {**meta, "split": "val"}, "shapes val")
    if scenes:
        pool = shapes.distinct_scenes(seed, scenes)
        train = [pool[i % scenes] for i in range(n)]
    else:
        train = [shapes.train_scene(seed, i) for i in range(n)]
    texts = None  # full captions
    if captions == "partial":
        texts = [shapes.partial_caption(s, np.random.default_rng([seed, i, 1])) for i, s in enumerate(train)]
    _write_shapes(out, train, res, enc, shard_size, meta, "shapes train", texts)
    dt = time.time() - t0
    print(f"{out}: wrote {n} train + {val} val images at {res}px in {dt:.1f}s "
          f"({(n + val) / dt:.0f} images/s)")
    return out


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default and keeps the text's own line breaks."""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shapes", help="the built-in synthetic shapes dataset (pixels are the latents)",
                       formatter_class=Help)
    p.add_argument("--out", required=True, help="output folder; the held-out split goes to OUT/val")
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--res", type=int, default=32, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the scenes (the dataset is a pure function of it)")
    p.add_argument("--shard-size", type=int, default=4096, help="records per shard")
    p.add_argument("--text-dim", type=int, default=64, help="built-in text encoder width")
    p.add_argument("--max-len", type=int, default=24, help="caption tokens (padded or truncated)")
    p.add_argument("--text-context", type=float, default=0.7,
                   help="built-in text encoder's causal context; 0 = none")
    p.add_argument("--val", type=int, default=512, help="held-out images written to OUT/val (0: none)")
    p.add_argument("--scenes", type=int, default=0,
                   help="training images cycle through this many distinct scenes; 0 = a fresh draw for each")
    p.add_argument("--captions", default="full", choices=["full", "partial"],
                   help="partial: each training caption names a random part of the attributes")
    p = sub.add_parser("prepare", formatter_class=Help,
                       help="encode image-caption pairs into VAE latents + caption features (resumable)")
    p.add_argument("--input", required=True, help="a folder of images with same-name .txt captions, "
                   "or a .jsonl or .csv with 'path' (relative to its folder) and 'caption'")
    p.add_argument("--out", required=True, help="output folder: OUT/<res>/ per resolution, OUT/report.json")
    p.add_argument("--res", type=int, nargs="+", default=[256, 512],
                   help="image sides (short side resized, centre crop)")
    p.add_argument("--vae", default=SDXL_VAE, help="Hub repo or local folder of a diffusers AutoencoderKL")
    p.add_argument("--vae-subfolder", default="vae", help="its subfolder (the repo root is tried next)")
    p.add_argument("--text-encoder", default=DFN5B_CLIP, help="Hub repo or local folder of a CLIP model "
                   "(open_clip or transformers layout)")
    p.add_argument("--text-encoder-subfolder", default=None, help="its subfolder, e.g. text_encoder_2")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--shard-size", type=int, default=1024,
                   help="input pairs per shard (skipped ones leave gaps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the VAE posterior samples")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads decoding images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sample", dest="sample", action="store_true", default=True,
                   help="store posterior samples x scaling factor, as the paper")
    g.add_argument("--mean", dest="sample", action="store_false", default=argparse.SUPPRESS,
                   help="store posterior means instead")
    parser.epilog = "\n".join(f"python data.py {name} ...:\n{q.format_help()}"
                              for name, q in sub.choices.items())
    args = parser.parse_args(argv)
    lowest = {"n": 1, "res": 8, "shard_size": 1, "batch_size": 1, "workers": 1, "max_len": 2, "text_dim": 2,
              "val": 0, "seed": 0, "scenes": 0}
    for key, low in lowest.items():
        values = getattr(args, key, None)  # None: not a flag of this command
        if not isinstance(values, list):  # --res of prepare is a list
            values = [values]
        for value in values:
            if value is not None and value < low:
                parser.error(f"--{key.replace('_', '-')}={value}: must be >= {low}")
    try:
        if args.command == "shapes":
            make_shapes_dataset(args.out, args.n, args.res, args.seed, args.shard_size, args.text_dim,
                                args.max_len, args.val, args.text_context, args.scenes, args.captions)
        else:
            prepare(args.input, args.out, args.res, args.vae, args.vae_subfolder, args.text_encoder,
                    args.text_encoder_subfolder, args.batch_size, args.device, args.shard_size, args.seed,
                    args.sample, args.workers)
    except (ValueError, OSError) as e:  # one line, no traceback
        # exit 2: the command must change (an input that is not there, a folder of another dataset);
        # 1: the job failed (a damaged file, no network, a full disk)
        code = 2 if isinstance(e, (UsageError, FileNotFoundError, FileExistsError)) else 1
        parser.exit(code, f"data.py: error: {e}\n")


if __name__ == "__main__":
    main()
