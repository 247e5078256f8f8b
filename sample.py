"""
Sample images from a checkpoint: the deterministic EDM sampler (Karras et al. 2022, Algorithm 2:
Heun's 2nd-order method on the Karras schedule) with classifier-free guidance.

    python sample.py --ckpt out/default --prompt "a red circle on the left" --n 8 --out out/red
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --prompts-file out/coco30k.txt --out out/coco30k

The output folder holds one job, and only its images besides two text files, so fid.py can read it as is:
    000000.png ...   image i: caption i of prompts.txt, seed --seed + i; written as soon as its batch is done
    prompts.txt      the caption of image i on line i
    sample.json      the job: ckpt, seed, steps, guidance, n, ema, bf16, count, and the command as run
and beside it OUT_grid.png (the first 64 images) once a job of at most 256 images is complete. A rerun of
the same command samples only the missing images; a folder of another job is refused (--overwrite deletes
its files first). Batches are fixed runs of --batch-size images, so the folder comes out byte-identical for
any torchrun --nproc_per_node and any interruptions (another --batch-size can move a rare pixel by one level:
float rounding). SIGTERM or Ctrl-C stop after the current batch, with exit code 128 + the signal (143, 130).
Every prompt is checked before the folder is claimed: words the built-in text encoder does not know, and
prompts longer than the text encoder reads (they are cut), are each said in one warning line. Errors are one
line: exit code 2 for a command that must change (a bad flag or value, an input that is not there), 1 for a
job that failed (a damaged checkpoint, no network, a full disk).
"""
import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import string
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import lock
from checkpoint import atomic_write, load_pretrained, read_json, remove, resolve_checkpoint
from config import UsageError
from encoders import PIXELS, check_hub, latents_to_images, load_encoders, spec_repo
from parallel import check_device, setup_distributed
from shapes import VOCABULARY, BuiltinTextEncoder

NUMBERED = re.compile(r"\d{6,}\.png")  # the images of a job: 000000.png, ..., 1000000.png
# a job's files, and what a kill -9 amid an atomic write leaves of them
JOB_FILE = re.compile(r"(\d{6,}\.png|sample\.json|prompts\.txt)(\.tmp)?")


@torch.no_grad()
def edm_sampler(D, y, seeds, steps=30, guidance=5.0, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Draw one latent per (caption features, seed) with the denoiser D (diffusion.Denoiser).
    y (B, L, Dy) -> latents (B, C, H, W) in float32."""
    cfg, device = D.net.cfg, y.device
    shape = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    # the initial noise of each image comes from its own generator: batch-size independent
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)),
                                     dtype=torch.float64) for s in seeds]).to(device)
    # Karras schedule (EDM Eq. 5): sigma_max -> sigma_min in steps, then 0
    i = torch.arange(steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho)
         + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])

    def denoise(x, sigma):
        # conditional and unconditional (all-zero caption) passes in one batch; guidance on the output
        s = torch.full((x.shape[0],), float(sigma), device=device)
        if guidance == 1.0:
            return D(x.float(), s, y)[0].double()
        D_x, _ = D(torch.cat([x, x]).float(), torch.cat([s, s]), torch.cat([y, torch.zeros_like(y)]))
        cond, uncond = D_x.double().chunk(2)
        return uncond + guidance * (cond - uncond)

    x = noise * t[0]  # the ODE state stays in float64, as in EDM's generate.py
    for k in range(steps):  # Algorithm 2 with S_churn = 0: Euler step, then Heun's correction
        d = (x - denoise(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if t[k + 1] > 0:
            d2 = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (d + d2) / 2
        x = x_next
    return x.float()


def image_grid(images, cols=None):
    """Tile uint8 (H, W, 3) images into one PIL image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(grid)


def sample_batch(D, config, encoders, prompts, seeds, steps, guidance, bf16=False):
    """uint8 (H, W, 3) images of one batch, caption prompts[j] with seed seeds[j]: the per-batch code of
    generate() and of the folder writer. bf16: autocast of the network only (the ODE state stays float64)."""
    encode, vae = encoders
    device = next(D.parameters()).device
    y = encode(prompts).to(device)  # (B, L, Dy)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = edm_sampler(D, y, seeds, steps, guidance)
    return latents_to_images(x, config.get("latents", PIXELS), vae)


def generate(D, config, prompts, seed=0, steps=30, guidance=5.0, batch_size=32, progress=True, encoders=None,
             bf16=False):
    """Images (uint8 arrays) for a list of prompts, the i-th with seed + i, from the denoiser D, in memory.
    encoders: (text encoder, VAE) from encoders.load_encoders, to load them once for many calls."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ValueError(f"prompt {i} is empty")
    encoders = encoders or load_encoders(config, next(D.parameters()).device)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not progress):
        end = min(start + batch_size, len(prompts))
        seeds = range(seed + start, seed + end)
        images += sample_batch(D, config, encoders, prompts[start:end], seeds, steps, guidance, bf16)
    return images

# -----------------------------------------------------------------------------
# The output folder: one job, resumable


def numbered(out):
    """{index: file name} of the images in folder `out`."""
    if not os.path.isdir(out):
        return {}
    return {int(f[:-4]): f for f in os.listdir(out) if NUMBERED.fullmatch(f)}


def read_lines(path):
    """The lines of a text file, or None if there is none."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()


def job_difference(out, job, prompts, have):
    """What makes the files in `out` another job than this one; '' for the same job or none."""
    lines = read_lines(f"{out}/prompts.txt")
    manifest = f"{out}/sample.json"
    if not os.path.exists(manifest):  # prompts.txt alone: a crash between the two writes of this job
        found = []
        if have:
            found.append(f"{len(have)} numbered PNGs")
        if lines is not None and lines != prompts:
            found.append("prompts.txt")
        if not found:
            return ""
        return " and ".join(found) + " but no sample.json"
    try:
        old = read_json(manifest)
        diff = [f"{k} {old.get(k)!r} vs {v!r}" for k, v in job.items() if k != "command" and old.get(k) != v]
    except (ValueError, AttributeError):
        return f"{manifest} is not a job of sample.py"
    if not diff and lines != prompts:
        lines = lines or []
        k = len(lines)  # the first line that differs; a shorter prompts.txt differs just past its end
        for j, (a, b) in enumerate(zip(lines, prompts)):
            if a != b:
                k = j
                break
        diff = [f"prompts.txt line {k + 1}: {lines[k:k + 1]} vs {prompts[k:k + 1]}"]
    beyond = sorted(i for i in have if i >= job["count"])
    if not diff and beyond:
        diff = [f"{len(beyond)} images beyond its count, e.g. {have[beyond[0]]}"]
    if not diff:
        return ""
    return "; ".join(diff) + " (the folder's vs this run's)"


def prepare_folder(out, job, prompts, overwrite=False):
    """Make `out` the folder of this job: check the job in it (or with overwrite delete another job's files),
    write prompts.txt and sample.json; returns the indices of the images still to sample."""
    os.makedirs(out, exist_ok=True)
    have = numbered(out)
    grid = f"{out}_grid.png"
    differs = job_difference(out, job, prompts, have)
    if differs:
        if not overwrite:
            raise UsageError(f"{out}/ holds another job: {differs}; pass --overwrite to delete its "
                             f"{len(have)} images, sample.json, prompts.txt and {grid}; or another --out")
        for f in filter(JOB_FILE.fullmatch, os.listdir(out)):
            remove(f"{out}/{f}")
        remove(grid)
        have = {}
    if not os.path.exists(f"{out}/sample.json"):  # prompts first: sample.json marks a whole job
        manifest = json.dumps(job, indent=2, allow_nan=False)  # strict JSON: a NaN raises, is never written
        with atomic_write(f"{out}/prompts.txt") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(p + "\n" for p in prompts))
        with atomic_write(f"{out}/sample.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest)
    return [i for i in range(job["count"]) if i not in have]


def sample_to_folder(D, config, encoders, prompts, todo, args, world, stop, bar):
    """Write the images `todo`, each PNG (atomically) as soon as its batch is done. A batch is a fixed run of
    --batch-size indices, sampled whole even if some of its images are on disk: an image's batch, and so its
    float rounding, depends neither on the number of ranks nor on interruptions. The ranks take turns over the
    batches and all-reduce once per batch (images written, signals seen), so they stop together; returns
    (images written by all ranks, the signal that stopped them or 0)."""
    rank, size = world
    bs = args.batch_size
    device = next(D.parameters()).device
    missing = set(todo)
    last = 0  # images this rank wrote in the previous round
    total = 0  # images all ranks wrote so far
    starts = sorted({i - i % bs for i in todo})  # the batches with images to write
    rounds = math.ceil(len(starts) / size)  # the same number on every rank, even one with no batch left
    starts = starts[rank::size]
    for r in range(rounds + 1):
        seen = stop.get("signal")
        counts = torch.tensor([last, seen == signal.SIGTERM, seen == signal.SIGINT], device=device)
        if size > 1:
            torch.distributed.all_reduce(counts)
        total += int(counts[0])
        bar.update(int(counts[0]))
        if counts[2]:  # Ctrl-C on any rank wins over SIGTERM
            return total, signal.SIGINT
        if counts[1]:
            return total, signal.SIGTERM
        if r == rounds:
            return total, 0
        if r >= len(starts):  # this rank has no batch this round, but takes part in the all-reduce
            last = 0
            continue
        ids = range(starts[r], min(starts[r] + bs, len(prompts)))
        images = sample_batch(D, config, encoders, [prompts[i] for i in ids], [args.seed + i for i in ids],
                              args.steps, args.guidance, args.bf16)
        new = [(i, image) for i, image in zip(ids, images) if i in missing]
        for i, image in new:
            with atomic_write(f"{args.out}/{i:06d}.png") as tmp:  # a crash never leaves half a PNG
                Image.fromarray(image).save(tmp, format="PNG")  # the name ends in .tmp: say the format
        last = len(new)

# -----------------------------------------------------------------------------
# The command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help: the docstring as written, and every flag with its default."""


def fail(message, code=2):
    """A one-line error a user can act on (printed once, by rank 0 under torchrun), then exit: code 2 for a
    command that must change (a bad flag or value, an input that is not there), 1 for a job that failed."""
    if os.environ.get("RANK", "0") == "0":
        print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def warn(message):
    """A one-line warning, printed once (by rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", default="out/default", help="a checkpoint folder, a training output folder "
                    "(its newest checkpoint), a Hub repo id user/name, a released .pt (or user/name/x/y.pt)")
    ap.add_argument("--official-preset", default="MicroDiT_XL_2", help="the preset of a released .pt")
    ap.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    ap.add_argument("--prompts-file", help="a text file, one caption per line (after the --prompt ones)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--steps", type=int, default=30, help="Heun steps (2 network calls each, 1 for the last)")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ap.add_argument("--batch-size", type=int, default=32, help="images per batch and process")
    ap.add_argument("--out", default="out/samples", help="the job's folder; the grid goes beside it")
    ap.add_argument("--overwrite", action="store_true", help="delete the files of another job in --out first")
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA weights exist")
    ap.add_argument("--text-encoder", help="repo id or folder of the text encoder, not the checkpoint's")
    ap.add_argument("--vae", help="repo id or folder of the VAE, not the checkpoint's")
    ap.add_argument("--device", default="auto", help="auto: cuda if there is one, else cpu; under torchrun, "
                    "CUDA ranks use cuda:LOCAL_RANK")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default="auto",
                    help="bf16 autocast of the network; auto: on CUDA, off on CPU")
    args = ap.parse_args(argv)
    for flag, low in (("n", 1), ("steps", 1), ("batch_size", 1), ("guidance", 0)):
        name, value = "--" + flag.replace("_", "-"), getattr(args, flag)
        if not math.isfinite(value):  # nan and inf pass `value < low`, and would make black images
            fail(f"{name} must be a finite number, got {value}")
        if value < low:
            fail(f"{name} must be >= {low}, got {value}")
    try:
        check_device(args.device)
    except ValueError as e:
        fail(str(e))
    args.out = os.path.normpath(args.out)
    return args


def read_prompts(args):
    """(caption, where it comes from) of each --prompt, then of each line of --prompts-file; each must be one
    non-empty line."""
    prompts = [(p, f"--prompt number {k + 1}") for k, p in enumerate(args.prompt)]
    path = args.prompts_file
    if path:
        if os.path.isdir(path):
            fail(f"--prompts-file {path} is a directory, not a text file of prompts")
        if not os.path.isfile(path):
            fail(f"--prompts-file {path}: no such file")
        try:  # utf-8-sig: the byte order mark some editors write first is not part of the first prompt
            with open(path, encoding="utf-8-sig") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts-file {path}: cannot be read as UTF-8 text ({type(e).__name__})")
        if not lines:
            fail(f"--prompts-file {path} is empty: write one prompt per line")
        prompts += [(p.strip(), f"--prompts-file {path}: line {k + 1}") for k, p in enumerate(lines)]
    for p, where in prompts:
        if not p.strip():
            fail(f"{where} is empty")
        if len(p.splitlines()) > 1:  # prompts.txt holds one caption per line
            fail(f"{where} holds a line break")
    return prompts


def listing(items, width=100):
    """The items joined by ', ', as many as fit in about `width` characters, then 'and N more'."""
    shown = []
    for item in items:
        if shown and len(", ".join(shown + [item])) > width:
            break
        shown.append(item)
    more = len(items) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def unknown_words(captions, encoder):
    """The words of the captions, as written and each once, that the built-in text encoder reads as noise or
    drops: words outside the shapes captions' vocabulary, and characters other than a-z, 0-9 and punctuation
    (accented letters, emoji)."""
    found = {}  # lower-cased word -> the word as first written
    read = re.compile(f"[a-z0-9{re.escape(string.punctuation)}]")  # what the encoder reads or skips as a gap
    for caption in captions:
        for word in caption.split():
            word = word.strip(string.punctuation)
            lower = word.lower()
            if word and (read.sub("", lower) or not set(encoder.words(lower)) <= VOCABULARY):
                found.setdefault(lower, word)
    return list(found.values())


def check_prompts(prompts, text_encoder):
    """What the text encoder cannot read, said before any work; prompts: (caption, where). A prompt without a
    word the built-in encoder reads is an error; the words it does not know, and the prompts longer than the
    encoder reads (they are cut), are one warning line each."""
    captions = [p for p, _ in prompts]
    if isinstance(text_encoder, BuiltinTextEncoder):
        tokens = [text_encoder.words(p) for p in captions]
        kept, unit = text_encoder.max_len, "words"
        for (p, where), t in zip(prompts, tokens):
            if not t:
                fail(f"{where} has no word the built-in text encoder reads (letters a-z, digits): {p!r}")
        unknown = [f'"{w}"' for w in unknown_words(captions, text_encoder)]
        if unknown:
            these = "this word" if len(unknown) == 1 else f"these {len(unknown)} words"
            warn(f"the model never saw {these}, outside the {len(VOCABULARY)} of the shapes captions that the "
                 f"built-in text encoder knows: {listing(unknown)}")
    else:  # a CLIP tokenizer: the start and end tokens take 2 of its max_len
        tokens = [text_encoder.tokenizer.encode(p) for p in captions]
        kept, unit = text_encoder.max_len - 2, "tokens"
    cut = [f"{where} ({kept} of {len(t):,} {unit} kept)"
           for (_, where), t in zip(prompts, tokens) if len(t) > kept]
    if cut:
        warn(f"the text encoder reads {kept} {unit} of a prompt; longer ones are cut: {listing(cut, 160)}")


def hub_repo(ref):
    """The Hub repo a --ckpt names ('user/name', or a file of it 'user/name/x.pt'), else None: told apart
    from a local path as checkpoint.resolve_checkpoint does."""
    parts = ref.strip("/").split("/")
    if os.path.exists(ref) or len(parts) < 2 or ref.startswith((".", "/")) or os.path.isdir(parts[0]):
        return None
    return "/".join(parts[:2])


def find_checkpoint(ref):
    """The local path of --ckpt: a folder or a file, or the files of a Hub repo (downloaded once)."""
    repo = hub_repo(ref)
    try:
        if repo:  # at once, not after a minute of retries, if the Hub is down
            check_hub(repo, "--ckpt PATH")
        ckpt = resolve_checkpoint(ref)
    except ConnectionError as e:  # the Hub cannot be reached: the job failed, the command was right
        fail(e, 1)
    except FileNotFoundError as e:
        fail(f"{e}; train one with `python train.py`, or give a Hub repo id")
    if os.path.isfile(ckpt) and ckpt.endswith(".safetensors"):
        fail(f"--ckpt {ref} is a weights file: pass its checkpoint folder "
             f"{os.path.dirname(ref) or '.'} (the one with config.json)")
    if os.path.isfile(ckpt) and not ckpt.endswith((".pt", ".pth", ".bin")):
        fail(f"--ckpt {ref}: neither a checkpoint folder (with config.json) nor a released .pt file")
    return ckpt


def main(argv=None):
    """Sample the job of the command line into --out; returns the exit code (0, or 128 + a signal)."""
    if argv is None:
        script, argv = sys.argv[0], sys.argv[1:]
    else:  # called from Python: the command recorded in sample.json names the script
        script, argv = "sample.py", list(argv)
    args = parse_args(argv)
    prompts = read_prompts(args)
    ckpt = find_checkpoint(args.ckpt)
    _, rank, size, device = setup_distributed(args.device)
    stop = {}  # {"signal": the first signal received}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame):  # stop after the current batch: what is on disk is whole, a rerun resumes
        stop.setdefault("signal", signum)
        signal.signal(signum, handlers[signum])  # a second Ctrl-C interrupts at once
    for s in handlers:
        signal.signal(s, on_signal)
    try:
        return run_job(args, ckpt, prompts, (rank, size), device, stop, shlex.join(["python", script, *argv]))
    except UsageError as e:  # the command must change
        fail(e)
    except (ValueError, OSError) as e:  # a damaged checkpoint, no network, a full disk: each names the file
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if size > 1:
            torch.distributed.destroy_process_group()


def load_job(args, ckpt, prompts, device, command):
    """Everything the job needs, every prompt checked, before anything is written: the denoiser, its config
    and encoders, the captions (each --n times) and the job that sample.json records."""
    D, config = load_pretrained(ckpt, not args.no_ema, device, official_preset=args.official_preset)
    overrides = (("text_encoder", "--text-encoder", args.text_encoder), ("latents", "--vae", args.vae))
    for key, flag, repo in overrides:
        if repo:  # e.g. a local copy of the encoders on a machine without network
            if not os.path.isdir(repo) and (repo.startswith((".", "/", "~")) or repo.count("/") != 1):
                fail(f"{flag} {repo}: no such folder, nor a Hub repo id user/name")
            config[key] = {**config[key], "repo": spec_repo(repo)}
        if config.get(key, {}).get("repo"):  # at once, not after a minute of retries, if the Hub is down
            check_hub(config[key]["repo"], f"{flag} PATH")
    if not prompts:  # default: the held-out captions the checkpoint was evaluated on
        held_out = config.get("eval_prompts", [])[:16]
        prompts = [(p, f"held-out caption {k + 1}") for k, p in enumerate(held_out)]
    if not prompts:
        fail("give --prompt or --prompts-file")
    encoders = load_encoders(config, device)
    check_prompts(prompts, encoders[0])
    prompts = [p for p, _ in prompts for _ in range(args.n)]
    if args.bf16 == "auto":
        args.bf16 = device.type == "cuda"
    job = {"ckpt": os.path.abspath(ckpt), "seed": args.seed, "steps": args.steps, "guidance": args.guidance,
           "n": args.n, "ema": not args.no_ema and os.path.isfile(os.path.join(ckpt, "ema.safetensors")),
           "bf16": args.bf16, "count": len(prompts), "command": command}
    return D, config, encoders, prompts, job


def claim_folder(args, job, prompts, world, held):
    """Make --out the folder of this job: rank 0 takes its lock (kept in `held`, an ExitStack, until the job
    ends), checks the job in it and writes prompts.txt and sample.json (a refusal travels to every rank as a
    message); returns the indices of the images still to sample."""
    todo = [None]
    if world[0] == 0:  # rank 0 alone owns the job's files
        try:  # a live sample.py on the same folder: refused (lock.Held), before anything is looked at
            held.enter_context(lock.hold(args.out, job="sample.py"))
            todo = [prepare_folder(args.out, job, prompts, args.overwrite)]
        except UsageError as e:  # the folder of another job
            todo = [(2, str(e))]
        except (ValueError, OSError) as e:  # a live job's folder, a full disk, a folder that cannot be written
            todo = [(1, str(e))]
    if world[1] > 1:
        torch.distributed.broadcast_object_list(todo, src=0)  # no rank writes before the folder is ready
    if isinstance(todo[0], tuple):
        fail(todo[0][1], todo[0][0])
    return todo[0]


def run_job(args, ckpt, prompts, world, device, stop, command):
    """Load and check everything, then claim the folder (the one place it is claimed: after every check),
    sample the missing images on every rank, then grid and report."""
    D, config, encoders, prompts, job = load_job(args, ckpt, prompts, device, command)
    with contextlib.ExitStack() as held:  # the folder's lock, released however the job ends
        todo = claim_folder(args, job, prompts, world, held)
        with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="sampling", unit="img",
                  disable=world[0] != 0) as bar:  # closed before any error is printed
            written, signum = sample_to_folder(D, config, encoders, prompts, todo, args, world, stop, bar)
        if world[1] > 1:
            torch.distributed.barrier()  # every rank's last images are on disk
        if world[0] == 0:
            report(args.out, ckpt, len(prompts), written, signum)
    return 128 + signum if signum else 0


def report(out, ckpt, count, written, signum):
    """The final line, and the grid beside the folder of a complete job of at most 256 images."""
    have = numbered(out)
    grid = f"{out}_grid.png"
    if signum:
        print(f"stopped by {signal.Signals(signum).name}: {len(have)} of {count} images on disk in "
              f"{out}/ ({written} written this run); the same command resumes", file=sys.stderr)
        return
    line = (f"{count} images from {ckpt} -> {out}/ (000000.png ... {count - 1:06d}.png, prompts.txt, "
            f"sample.json; {written} written this run, {count - written} were on disk)")
    if len(have) == count <= 256:  # beside the folder: inside it, fid.py would count the grid as a sample
        images = [np.asarray(Image.open(f"{out}/{have[i]}").convert("RGB")) for i in range(min(64, count))]
        with atomic_write(grid) as tmp:
            image_grid(images).save(tmp, format="PNG")
        line += f"; grid beside it: {grid}"
    print(line)


if __name__ == "__main__":
    sys.exit(main())
