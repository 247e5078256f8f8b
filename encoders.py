"""
The frozen encoders, written by hand in plain PyTorch and loaded from the Hugging Face Hub or a local folder:
the CLIP BPE tokenizer, the CLIP text tower (open_clip or transformers layout), CLIP's image tower for the
CLIP score, and the SDXL VAE (diffusers' AutoencoderKL layout), with parity to the reference libraries tested
in tests/test_encoders.py and tests/test_clip.py. Encoder specs name them as plain data: every dataset's
index.json and every checkpoint's config.json carries a "text_encoder" and a "latents" spec, and sample.py
rebuilds the encoders from them.
"""
import functools
import gzip
import html
import math
import os
import re
import sys
import unicodedata
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants, get_session
from PIL import Image

from checkpoint import (RELEASED_TEXT_ENCODER, RELEASED_VAES, find_file, hub_file, load_state_dict, read_json,
                        read_weights)
from shapes import PIXELS, BuiltinTextEncoder, latent_to_image  # the shapes dataset: pixels as the latents

SDXL_VAE = RELEASED_VAES[4]["repo"]  # subfolder "vae"; 4 channels, scaling_factor 0.13025 (its config.json)
DFN5B_CLIP = RELEASED_TEXT_ENCODER["repo"]  # open_clip format, text width 1024, 24 layers, quick_gelu true


def frozen(model, device, dtype=torch.float32):
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def spec_repo(repo):
    """A repo as a spec names it: a local folder by its absolute path (valid from anywhere), else its id."""
    return os.path.abspath(repo) if os.path.isdir(repo) else repo


def check_hub(repo, local):
    """Fail at once if `repo` is neither a local folder nor cached and the Hub cannot be reached (huggingface_hub
    would retry for a minute, then call its files missing). local: the way to a local copy, e.g. "--vae PATH"."""
    cache = hf_constants.HF_HUB_CACHE
    if os.path.isdir(repo) or os.path.isdir(os.path.join(cache, "models--" + repo.replace("/", "--"))):
        return  # huggingface_hub reads a cached repo at once when the Hub is down
    try:
        get_session().head(hf_constants.ENDPOINT, timeout=5)  # refused at once when HF_HUB_OFFLINE is set
    except Exception as e:  # offline mode, refused, no route, no name server, a proxy's error, a timeout
        why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else f"{hf_constants.ENDPOINT}: {e}"
        raise ConnectionError(f"the Hugging Face Hub cannot be reached ({why}), and {repo} is not in the HF "
                              f"cache ({cache}): pass {local}, a local copy of it, or fill the cache where the "
                              "Hub can be reached and run with HF_HUB_OFFLINE=1") from None

# -----------------------------------------------------------------------------
# CLIP BPE tokenizer (byte-level BPE over the 49,408-entry CLIP vocabulary), without ftfy or the regex module


def _ftfy_lite():
    """str.translate table for ftfy.fix_text's fixes of valid UTF-8 text (ftfy is not a runtime dep)."""
    # Kept: invisible control characters deleted, C1 controls read as the cp1252 characters they usually are,
    # full/half-width forms, the ideographic space and Latin ligatures to normal letters, curly quotes
    # straightened. Not repeated: mojibake repair (text decoded with the wrong codec, e.g. "cafÃ©") and
    # rarer heuristics.
    quotes = {**dict.fromkeys(map(ord, "\u02bc\u2018\u2019\u201a\u201b"), "'"),
              **dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')}
    table = dict.fromkeys([*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                           *range(0xFFF9, 0xFFFD)])  # deleted
    table |= {i: bytes([i]).decode("cp1252") for i in range(0x80, 0xA0)
              if i not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)}
    wide_and_ligatures = [*range(0xFF01, 0xFFF0), *range(0xFB00, 0xFB07), 0x132, 0x133, 0x149,
                          *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4)]
    table |= {i: unicodedata.normalize("NFKC", chr(i)) for i in wide_and_ligatures}
    table |= {0x3000: " ", 0xFB05: "\u017ft"} | quotes  # ftfy spells the long-s-t ligature with a long s
    # one pass: quotes produced above straightened too
    return {k: v and v.translate(quotes) for k, v in table.items()}


_FTFY_LITE = _ftfy_lite()


def clean_caption(text):
    """CLIP's text cleaning: HTML unescape (twice), ftfy-lite, NFC, whitespace runs to a space, lower case."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)).translate(_FTFY_LITE))
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=None)
def _byte_to_unicode():
    """Each byte -> a printable character (the GPT-2/CLIP table): BPE never sees spaces or control bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]  # the rest are shifted to code points 256, 257, ...
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


@functools.lru_cache(maxsize=1)
def _split_regex():
    """CLIP's pre-tokenizer  's|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+
    written for the `re` module."""
    # In `re`, [^\W\d_] is "a letter or a non-decimal number": the ~1,100 non-decimal numbers
    # (categories Nl/No, e.g. ², ½, Ⅻ, ①) are listed explicitly so that letter runs stop at them
    # and they count as single numbers, as \p{N}.
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
        self.vocab = vocab  # token -> id
        self.ranks = {m: i for i, m in enumerate(merges)}  # a pair's merge rank: the lowest merges first
        self.max_len = max_len
        self.sot, self.eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]  # 49406, 49407
        self.pad_id = vocab[pad] if isinstance(pad, str) else pad  # open_clip pads with 0, HF with a token
        self.byte_encoder = _byte_to_unicode()
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge)

    @classmethod
    def from_hf_files(cls, vocab_json, merges_txt, pad="<|endoftext|>", max_len=77):
        """From a Hugging Face vocab.json + merges.txt (whose first line is a '#version' header)."""
        with open(merges_txt, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")
                      if line and not line.startswith("#version")]
        return cls(read_json(vocab_json), merges, pad, max_len)

    @classmethod
    def from_bpe_file(cls, path, pad=0, max_len=77):
        """From open_clip's / OpenAI's bpe_simple_vocab_16e6.txt.gz: the vocabulary is rebuilt from it."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            # 48,894 merges
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
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
        """One caption -> BPE ids, without start/end tokens; special-token strings in it are plain text."""
        ids = []
        for word in _split_regex().findall(clean_caption(text)):
            byte_chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[p] for p in self._bpe(byte_chars))
        return ids

    def __call__(self, captions):
        out = torch.full((len(captions), self.max_len), self.pad_id, dtype=torch.long)
        # over-long captions are cut, keeping the end token (as open_clip and HF)
        for i, text in enumerate(captions):
            ids = [self.sot] + self.encode(text)[: self.max_len - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

# -----------------------------------------------------------------------------
# CLIP text transformer, in open_clip's key layout; HF CLIPTextModel checkpoints are renamed to it on load


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP (and DFN5B, says its config) trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention, open_clip's fused in_proj (q, k, v stacked); causal=False for images."""

    def __init__(self, width, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, T, head_dim) each
        # text: token t sees tokens <= t, as CLIP was trained; image patches all see each other
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, T, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads, mlp_width, act, eps, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width),
                                             gelu=QuickGELU() if act == "quick_gelu" else nn.GELU(),
                                             c_proj=nn.Linear(mlp_width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPTextTransformer(nn.Module):
    """Token ids (B, T) -> token features (B, T, width) after ln_final; no pooling, no text_projection: the
    features MicroDiT conditions on (micro_diffusion/models/utils.py)."""

    def __init__(self, vocab_size=49408, context_length=77, width=512, heads=8, layers=12, mlp_width=2048,
                 act="gelu", eps=1e-5):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP text activation {act!r} (expected 'gelu' or 'quick_gelu')")
        # uninitialised, as its weights are always loaded (normal_ on the meta device takes 1s)
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
        self.model = model
        self.tokenizer = tokenizer
        self.name = name  # where the weights came from
        self.dim = model.ln_final.weight.shape[0]  # feature width
        self.max_len = tokenizer.max_len  # tokens per caption

    def forward(self, captions):
        if isinstance(captions, str):
            raise TypeError("TextEncoder takes a list of captions, not a single string")
        return self.model(self.tokenizer(captions).to(self.model.positional_embedding.device))


_HF_TO_OPEN_CLIP = [("embeddings.token_embedding.weight", "token_embedding.weight"),
                    ("final_layer_norm", "ln_final"),
                    ("embeddings.position_embedding.weight", "positional_embedding"), ("layer_norm1", "ln_1"),
                    ("encoder.layers.", "transformer.resblocks."), ("self_attn.out_proj", "attn.out_proj"),
                    ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
# Keys a checkpoint may carry that the token features do not use: the image tower, the CLIP-space projections
# (the features are taken before text_projection), the temperature, and buffers older checkpoints saved.
_UNUSED = ("visual.", "vision_model.", "visual_projection", "text_projection", "logit_scale", "logit_bias",
           "embeddings.position_ids", "attn_mask")


def hf_to_open_clip(sd):
    """An HF CLIPTextModel state dict in open_clip's names, with q/k/v fused into in_proj_{weight,bias}."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # the prefix before transformers 5
    for k in [k for k in sd if ".self_attn.q_proj." in k]:
        names = [k.replace("q_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
        if all(n in sd for n in names):  # otherwise they stay as they are, and the key check names them
            sd[k.replace("self_attn.q_proj.", "attn.in_proj_")] = torch.cat([sd.pop(n) for n in names])
    out = {}
    for k, v in sd.items():
        if not re.search(r"self_attn\.[qkv]_proj", k):  # unfused q/k/v keep their names for the error
            for a, b in _HF_TO_OPEN_CLIP:
                k = k.replace(a, b)
        out[k] = v
    return out


_WEIGHT_FILES = {"open_clip": ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
                 "hf": ["model.safetensors", "pytorch_model.bin"]}


def clip_text_arch(cfg, cfg_name, cfg_path):
    """(family, CLIPTextTransformer kwargs) of an open_clip_config.json or an HF CLIP(Text)Model config."""
    if cfg_name == "open_clip_config.json":  # open_clip: DFN5B, LAION ViT-H/14
        model_cfg = cfg.get("model_cfg", cfg)
        t = model_cfg.get("text_cfg", {})
        odd = [k for k in ("hf_model_name", "ls_init_value", "no_causal_mask", "embed_cls", "act_kwargs")
               if t.get(k)]
        if odd:
            raise ValueError(f"{cfg_path}: text_cfg options {odd} are not supported "
                             "(only the built-in text tower)")
        width = t.get("width", 512)
        return "open_clip", dict(vocab_size=t.get("vocab_size", 49408), width=width,
                                 context_length=t.get("context_length", 77), heads=t.get("heads", 8),
                                 layers=t.get("layers", 12), mlp_width=int(width * t.get("mlp_ratio", 4.0)),
                                 act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", eps=1e-5)
    # HF: CLIPTextModel(WithProjection) config, or a full CLIPModel config with the text tower nested
    t = cfg.get("text_config", cfg)
    if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not a CLIP text model")
    return "hf", dict(vocab_size=t.get("vocab_size", 49408),
                      context_length=t.get("max_position_embeddings", 77), width=t.get("hidden_size", 512),
                      heads=t.get("num_attention_heads", 8), layers=t.get("num_hidden_layers", 12),
                      mlp_width=t.get("intermediate_size", 2048), act=t.get("hidden_act", "quick_gelu"),
                      eps=t.get("layer_norm_eps", 1e-5))


def load_text_encoder(repo_or_path=DFN5B_CLIP, subfolder=None, device="cpu", dtype=torch.float32):
    """A frozen CLIP text tower + tokenizer from an open_clip or HF CLIPTextModel folder (format detected)."""
    cfg_path, cfg_name, folder = find_file(repo_or_path, ["open_clip_config.json", "config.json"],
                                           [subfolder])
    family, arch = clip_text_arch(read_json(cfg_path), cfg_name, cfg_path)
    weights, _, _ = find_file(repo_or_path, _WEIGHT_FILES[family], [folder])
    with torch.device("meta"):
        model = CLIPTextTransformer(**arch)
    sd = read_weights(weights, skip=_UNUSED)
    if family == "hf":
        sd = hf_to_open_clip(sd)
    # open_clip models with custom_text=true keep the text tower under "text."
    sd = {k.removeprefix("text."): v for k, v in sd.items()}
    load_state_dict(model, {k: v for k, v in sd.items() if not k.startswith(_UNUSED)}, cfg_path, assign=True)
    tokenizer = load_tokenizer(repo_or_path, subfolder, family, arch["context_length"])
    enc = TextEncoder(model, tokenizer, name=f"{repo_or_path}/{folder or ''}".rstrip("/"))
    enc.spec = {"type": "clip", "repo": spec_repo(repo_or_path), "subfolder": subfolder, "dim": enc.dim,
                "max_len": enc.max_len}
    return frozen(enc, device, dtype)


def load_tokenizer(repo_or_path, subfolder=None, family="open_clip", max_len=77):
    """The CLIP tokenizer from the vocab.json + merges.txt (or open_clip's bpe .txt.gz) beside the weights."""
    # e.g. SDXL: text_encoder_2/ -> tokenizer_2/; DFN5B: the repo root
    folders = [subfolder, subfolder.replace("text_encoder", "tokenizer")] if subfolder else []
    folders = list(dict.fromkeys([*folders, "tokenizer", None]))
    path, name, folder = find_file(repo_or_path, ["vocab.json", "bpe_simple_vocab_16e6.txt.gz"], folders)
    if name.endswith(".gz"):
        return CLIPTokenizer.from_bpe_file(path, pad=0, max_len=max_len)
    pad = 0  # open_clip pads with id 0 whatever the repo's HF tokenizer files say
    if family == "hf":
        # HF pads with its pad_token: "<|endoftext|>" for OpenAI CLIP-L, "!" (id 0) for LAION/SDXL's 2nd
        tok_cfg = (hub_file(repo_or_path, "tokenizer_config.json", folder)
                   or hub_file(repo_or_path, "special_tokens_map.json", folder))
        pad = read_json(tok_cfg).get("pad_token") if tok_cfg else None
        if not pad:  # no tokenizer file, or none that names a pad token
            pad = "<|endoftext|>"
        if isinstance(pad, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
            pad = pad["content"]
    merges, _, _ = find_file(repo_or_path, ["merges.txt"], [folder])
    return CLIPTokenizer.from_hf_files(path, merges, pad, max_len)

# -----------------------------------------------------------------------------
# CLIP's image tower and joint image-text space (Radford et al. 2021), for the CLIP score (Hessel et al.
# 2021), in open_clip's key layout like the text tower; HF CLIPModel checkpoints are renamed to it on load

OPENAI_CLIP_L = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIPScore model (HF CLIPModel layout)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's normalisation, CLIPImageProcessor's default
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionTransformer(nn.Module):
    """Normalised images (B, 3, S, S) -> the projected class token (B, embed_dim): CLIP's ViT."""

    def __init__(self, image_size=224, patch_size=14, width=1024, heads=16, layers=24, mlp_width=4096,
                 act="quick_gelu", eps=1e-5, embed_dim=768):
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP image activation {act!r} (expected 'gelu' or 'quick_gelu')")
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)  # HF: patch_embedding
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)  # HF: pre_layrnorm (sic)
        blocks = [ResidualAttentionBlock(width, heads, mlp_width, act, eps, causal=False)  # no mask
                  for _ in range(layers)]
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(blocks)})
        self.ln_post = nn.LayerNorm(width, eps=eps)  # HF: post_layernorm
        self.proj = nn.Parameter(torch.empty(width, embed_dim))  # x @ proj: HF's visual_projection.weight.T

    def forward(self, x):  # x (B, 3, S, S)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, width): N = (S / patch)^2 patches
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)  # (B, 1 + N, width)
        for block in self.transformer["resblocks"]:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj  # the class token: (B, embed_dim)


class CLIP(nn.Module):
    """Images and captions -> their embeddings in CLIP's joint space (B, embed_dim), not L2-normalised."""

    def __init__(self, vision, text, embed_dim):
        super().__init__()
        self.visual = CLIPVisionTransformer(**vision, embed_dim=embed_dim)
        self.text = CLIPTextTransformer(**text)
        self.text_projection = nn.Parameter(torch.empty(text["width"], embed_dim))  # x @ text_projection
        self.logit_scale = nn.Parameter(torch.empty(()))  # the contrastive temperature: loaded, never used
        # Set by load_clip: the tokenizer; where a caption's feature is taken (eos_id None: at the largest id,
        # as OpenAI, open_clip and HF with the legacy eos_token_id 2; else at the first eos_id, as HF); the
        # image preprocessing (clip_preprocess's keyword arguments).
        self.tokenizer = None
        self.eos_id = None
        self.image_cfg = {}

    def encode_image(self, pixels):  # (B, 3, S, S) from clip_preprocess -> (B, embed_dim)
        return self.visual(pixels.to(self.visual.proj.dtype))

    def encode_text(self, captions):  # B captions -> (B, embed_dim)
        tokens = self.tokenizer(captions).to(self.text_projection.device)  # (B, 77), end token kept if cut
        x = self.text(tokens)  # (B, 77, width)
        end = tokens.argmax(-1) if self.eos_id is None else (tokens == self.eos_id).int().argmax(-1)
        return x[torch.arange(len(x)), end] @ self.text_projection  # the end-of-text token's feature


def clip_preprocess(img, size=224, crop=224, mean=CLIP_MEAN, std=CLIP_STD, resample=3, squash=False):
    """PIL image -> (3, crop, crop) float32 tensor as CLIPImageProcessor: RGB, short side to `size` (PIL
    `resample`, 3: bicubic, on uint8), centre crop, [0, 1], (x - mean) / std. squash: to crop x crop."""
    if "A" in img.getbands() or "transparency" in img.info:  # onto white, as HF's convert_to_rgb
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255,) * 4), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    if squash:  # open_clip's resize_mode "squash"
        img = img.resize((crop, crop), resample)
    elif w <= h:  # the long side truncated, as HF and torchvision.Resize: int(size * long / short)
        img = img.resize((size, int(size * h / w)), resample)
    else:
        img = img.resize((int(size * w / h), size), resample)
    # HF's offsets, floor((H - crop) / 2); open_clip's torchvision CenterCrop rounds, one pixel over at times
    top, left = (img.height - crop) // 2, (img.width - crop) // 2
    x = np.asarray(img.crop((left, top, left + crop, top + crop)), np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (crop, crop, 3)
    return torch.from_numpy(x).permute(2, 0, 1)


_HF_VISION = [("embeddings.class_embedding", "class_embedding"), ("embeddings.patch_embedding.", "conv1."),
              ("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")]
_HF_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}


def hf_clip_to_clip(sd):
    """Rename an HF CLIPModel state dict to the CLIP module's layout (open_clip's names, text in "text.")."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # buffers older checkpoints saved

    def tower(prefix):  # the keys of one tower, without its prefix, in open_clip's names
        return hf_to_open_clip({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    out = {"text." + k: v for k, v in tower("text_model.").items()}
    for k, v in tower("vision_model.").items():  # the same blocks; the embeddings and the two norms renamed
        for a, b in _HF_VISION:
            k = k.replace(a, b)
        out["visual." + k] = v
    for k, v in sd.items():  # the projections; logit_scale; strays, named later by the key check
        if k in _HF_PROJECTIONS:  # a Linear's (out, in) weight W -> x @ W.T
            out[_HF_PROJECTIONS[k]] = v.T.contiguous()
        elif not k.startswith(("text_model.", "vision_model.")):
            out[k] = v
    return out


def open_clip_to_clip(sd):
    """An open_clip CLIP state dict in the CLIP module's layout: the text tower's keys under "text."."""
    out = {}
    for k, v in sd.items():
        if not k.endswith("attn_mask"):  # the causal mask, a buffer older checkpoints saved
            k = k.removeprefix("text.")  # custom_text models (CustomTextCLIP) have it, projection included
            if not (k.startswith("visual.") or k in ("text_projection", "logit_scale")):
                k = "text." + k  # the text tower's own keys
            out[k] = v
    return out


def _hf_clip_cfg(cfg, repo):
    """(vision kwargs, embed_dim, eos_id, image_cfg) of an HF CLIPModel config + preprocessor_config.json."""
    v = cfg["vision_config"]
    vision = dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                  width=v.get("hidden_size", 768), heads=v.get("num_attention_heads", 12),
                  layers=v.get("num_hidden_layers", 12), mlp_width=v.get("intermediate_size", 3072),
                  act=v.get("hidden_act", "quick_gelu"), eps=v.get("layer_norm_eps", 1e-5))
    eos = cfg.get("text_config", {}).get("eos_token_id", 49407)  # HF CLIPTextModel's pooling, copied
    path = hub_file(repo, "preprocessor_config.json")
    p = read_json(path) if path else {}
    size, crop = p.get("size", vision["image_size"]), p.get("crop_size", vision["image_size"])
    if isinstance(size, dict) and "shortest_edge" not in size:
        raise ValueError(f"{path}: size {size} is not supported (only shortest_edge, as CLIP's)")
    if isinstance(size, dict):
        size = size["shortest_edge"]
    if isinstance(crop, dict):
        crop = crop["height"]
    image_cfg = dict(size=size, crop=crop, resample=p.get("resample", 3), mean=p.get("image_mean", CLIP_MEAN),
                     std=p.get("image_std", CLIP_STD))
    eos_id = None if eos == 2 else eos  # 2: a legacy eos_token_id, which means "at the largest id"
    return vision, cfg.get("projection_dim", 512), eos_id, image_cfg


def _open_clip_cfg(cfg, cfg_path):
    """(vision kwargs, embed_dim, eos_id, image_cfg) of an open_clip_config.json."""
    model_cfg = cfg.get("model_cfg", cfg)
    v = model_cfg.get("vision_cfg", {})
    t = model_cfg.get("text_cfg", {})
    pre = cfg.get("preprocess_cfg", {})
    odd = [k for k in ("timm_model_name", "ls_init_value", "attentional_pool", "no_ln_pre", "act_kwargs",
                       "norm_kwargs", "qk_norm", "scaled_cosine_attn", "proj_bias") if v.get(k) or t.get(k)]
    allowed = {"pool_type": (v.get("pool_type", "tok"), ("tok",)),  # value, supported values
               "text pool_type": (t.get("pool_type", "argmax"), ("argmax",)),
               "resize_mode": (pre.get("resize_mode", "shortest"), ("shortest", "squash")),
               "interpolation": (pre.get("interpolation", "bicubic"), ("bicubic", "bilinear"))}
    odd += [f"{k} {value!r}" for k, (value, ok) in allowed.items() if value not in ok]
    layers, size = v.get("layers", 12), v.get("image_size", 224)
    if odd or not isinstance(layers, int) or not isinstance(size, int):
        raise ValueError(f"{cfg_path}: options {odd or [layers, size]} are not supported "
                         "(only OpenAI CLIP's ViT: square images, class token, text pooled at the end token)")
    width = v.get("width", 768)
    vision = dict(image_size=size, patch_size=v.get("patch_size", 16), width=width, layers=layers,
                  heads=width // v.get("head_width", 64), mlp_width=int(width * v.get("mlp_ratio", 4.0)),
                  act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", eps=1e-5)
    image_cfg = dict(size=size, crop=size, mean=pre.get("mean", CLIP_MEAN), std=pre.get("std", CLIP_STD),
                     resample={"bicubic": 3, "bilinear": 2}[allowed["interpolation"][0]],
                     squash=pre.get("resize_mode") == "squash")
    return vision, model_cfg.get("embed_dim", 512), None, image_cfg


def load_clip(repo_or_path=OPENAI_CLIP_L, device="cpu", dtype=torch.float32):
    """A frozen CLIP (both towers, projections, tokenizer, preprocessing) from an HF CLIPModel or an open_clip
    folder or Hub repo (format detected)."""
    cfg_path, cfg_name, _ = find_file(repo_or_path, ["open_clip_config.json", "config.json"], [None])
    cfg = read_json(cfg_path)
    family, text = clip_text_arch(cfg, cfg_name, cfg_path)
    if family == "hf" and "vision_config" not in cfg:
        raise ValueError(f"{cfg_path}: no vision_config: a CLIP text model, not a CLIPModel with images")
    if family == "hf":
        vision, embed_dim, eos_id, image_cfg = _hf_clip_cfg(cfg, repo_or_path)
    else:
        vision, embed_dim, eos_id, image_cfg = _open_clip_cfg(cfg, cfg_path)
    weights, _, _ = find_file(repo_or_path, _WEIGHT_FILES[family], [None])
    with torch.device("meta"):
        model = CLIP(vision, text, embed_dim)
    convert = hf_clip_to_clip if family == "hf" else open_clip_to_clip
    load_state_dict(model, convert(read_weights(weights)), weights, assign=True)
    model.tokenizer = load_tokenizer(repo_or_path, None, family, text["context_length"])
    model.eos_id = eos_id
    model.image_cfg = image_cfg
    model.name = repo_or_path
    return frozen(model, device, dtype)

# -----------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL (the LDM "KL-f8" autoencoder), same module tree so the state dict keys match

VAE_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=[64], layers_per_block=1, act_fn="silu",
                    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, shift_factor=None,
                    latents_mean=None, use_quant_conv=True, use_post_quant_conv=True,
                    mid_block_add_attention=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (1x1-projected when the width changes)."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        if self.conv_shortcut is not None:  # the width changes
            x = self.conv_shortcut(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions (one per mid block), with a residual."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers has a Dropout at to_out.1: no weights

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
    """n ResnetBlocks, then an optional 2x resampling conv: DownEncoderBlock2D / UpDecoderBlock2D."""

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
        if self.resample == "down":
            # LDM pads right/bottom only, so a stride-2 3x3 conv halves H and W exactly
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
        self.down_blocks = nn.ModuleList()
        for i in range(len(ch)):
            resample = "down" if i < len(ch) - 1 else None  # all but the last level halve H and W
            self.down_blocks.append(Block(ch[max(i - 1, 0)], ch[i], n, g, resample))
        self.mid_block = MidBlock(ch[-1], g, c["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c["latent_channels"], 3, padding=1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent (B, C, h, w) -> image (B, 3, h*f, w*f): the encoder mirrored, with one more resnet a level."""

    def __init__(self, c):
        super().__init__()
        ch, n, g = c["block_out_channels"][::-1], c["layers_per_block"] + 1, c["norm_num_groups"]
        self.conv_in = nn.Conv2d(c["latent_channels"], ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c["mid_block_add_attention"])
        self.up_blocks = nn.ModuleList()
        for i in range(len(ch)):
            resample = "up" if i < len(ch) - 1 else None  # all but the last level double H and W
            self.up_blocks.append(Block(ch[max(i - 1, 0)], ch[i], n, g, resample))
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
        blocks = {*c.get("down_block_types", ["DownEncoderBlock2D"]),
                  *c.get("up_block_types", ["UpDecoderBlock2D"])}
        if c["act_fn"] != "silu" or blocks - {"DownEncoderBlock2D", "UpDecoderBlock2D"} or c["latents_mean"]:
            raise ValueError(f"unsupported AutoencoderKL config (act_fn {c['act_fn']}, "
                             f"blocks {sorted(blocks)}, latents_mean {c['latents_mean']}): "
                             "only the SD/SDXL-style KL-f8 layout is implemented")
        self.config = c
        L = c["latent_channels"]
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if c["use_post_quant_conv"] else None
        self.latent_channels, self.scaling_factor = L, float(c["scaling_factor"])
        self.downsample_factor = 2 ** (len(c["block_out_channels"]) - 1)  # 8 for SD/SDXL: 256px -> 32x32
        self.shift_factor = None if c["shift_factor"] is None else float(c["shift_factor"])  # SDXL: null

    def encode(self, images, sample=True, generator=None, noise=None):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8): posterior sample (or mean), shifted and scaled."""
        moments = self.encoder(images.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        z = mean
        # MicroDiT stores posterior samples, not means (micro_diffusion/datasets/prepare/*/precompute.py);
        # noise is drawn on the generator's device
        if sample:
            if noise is None:
                device = generator.device if generator is not None else mean.device
                noise = torch.randn(mean.shape, generator=generator, device=device,
                                    dtype=mean.dtype).to(mean.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def decode(self, latents):
        """Scaled latents (B, C, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        z = latents.to(self.decoder.conv_in.weight.dtype) / self.scaling_factor + (self.shift_factor or 0.0)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


_OLD_VAE_NAMES = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                  (".proj_attn.", ".to_out.0.")]


def load_vae(repo_or_path=SDXL_VAE, subfolder="vae", device="cpu", dtype=torch.float32):
    """A frozen AutoencoderKL from a diffusers folder (config.json + diffusion_pytorch_model.safetensors)."""
    folders = [subfolder, None] if subfolder else [None]  # ostris/vae-kl-f8-d16 keeps its files at the root
    cfg_path, _, folder = find_file(repo_or_path, ["config.json"], folders)
    weights, _, _ = find_file(repo_or_path, ["diffusion_pytorch_model.safetensors"], [folder])
    with torch.device("meta"):
        vae = AutoencoderKL(read_json(cfg_path))
    sd = {}
    # files saved before diffusers 0.14 (e.g. SD 2.1's VAE) use old names
    for k, v in read_weights(weights).items():
        for old, new in _OLD_VAE_NAMES:
            k = k.replace(old, new)
        sd[k] = v
    vae.name = f"{repo_or_path}/{folder or ''}".rstrip("/")  # where the weights came from
    load_state_dict(vae, sd, vae.name, assign=True)
    vae.spec = {"type": "vae", "repo": spec_repo(repo_or_path), "subfolder": subfolder,
                "scaling_factor": vae.scaling_factor, "latent_channels": vae.latent_channels}
    return frozen(vae, device, dtype)

# -----------------------------------------------------------------------------
# Encoder specs: the frozen encoders of a dataset named as plain data. Every index.json's meta carries
# "text_encoder" and "latents" specs, train.py copies them into each checkpoint's config, and sample.py
# rebuilds the encoders from them. Every loader records the spec it was loaded from as `.spec`.


def text_encoder_from_spec(spec, device="cpu"):
    """The frozen text encoder a spec names: {'type': 'builtin', 'dim', 'max_len', 'context'} or a CLIP's."""
    if spec.get("type") == "builtin":
        # runs on the CPU whatever the device; its output is moved by the caller
        return BuiltinTextEncoder(spec["dim"], spec["max_len"], spec.get("context", 0.0))  # older specs: none
    if spec.get("type") == "clip":
        return _checked(load_text_encoder(spec["repo"], spec.get("subfolder"), device=device), spec)
    raise ValueError(f"unknown text encoder spec {spec!r}: expected type 'builtin' or 'clip'")


def vae_from_spec(spec, device="cpu"):
    """The frozen VAE a latent spec names: an AutoencoderKL for {'type': 'vae', ...}, None for pixels."""
    if spec.get("type") == "pixels":
        return None
    if spec.get("type") == "vae":
        return _checked(load_vae(spec["repo"], spec.get("subfolder"), device=device), spec)
    raise ValueError(f"unknown latent spec {spec!r}: expected type 'pixels' or 'vae'")


def load_encoders(config, device="cpu"):
    """The frozen text encoder and VAE (None for pixel-space data) named by a checkpoint's config."""
    return (text_encoder_from_spec(config["text_encoder"], device),
            vae_from_spec(config.get("latents", PIXELS), device))


def _checked(encoder, spec):
    """The encoder, checked to have the shape and scale its spec recorded (a repo's files may change)."""
    bad = {k: (v, encoder.spec[k]) for k, v in spec.items()
           if k not in ("repo", "subfolder") and encoder.spec.get(k, v) != v}
    if bad:
        raise ValueError(f"{spec['repo']}: the loaded encoder differs from its spec (spec, loaded): {bad}")
    return encoder


@torch.no_grad()
def latents_to_images(x, spec, vae=None):
    """Latents (B, C, h, w) -> list of uint8 (H, W, 3) images, decoded by the spec's VAE (loaded if None)."""
    if vae is None:
        vae = vae_from_spec(spec, x.device)  # None for pixels: the latents are the images
    if vae is not None:
        x = vae.decode(x.to(vae.decoder.conv_in.weight.device))  # (B, 3, 8h, 8w), about [-1, 1]
    return list(latent_to_image(x))
