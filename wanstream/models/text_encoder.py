"""UMT5-XXL text encoder: Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` run by transformers' ``UMT5EncoderModel``.

The released file is a plain state dict under Wan's own key names; :func:`convert_wan_t5_to_transformers` maps
them onto ``UMT5EncoderModel`` (same maths: per-layer bidirectional relative bias with 32 log buckets up to 128,
no 1/sqrt(d) scaling, gated tanh-GELU FFN, fp32-variance RMSNorm). Prompts are cleaned as Wan does, tokenized to
512 tokens, encoded with the padding mask, and the rows after each prompt's true length are zeroed
(``[B, 512, 4096]``). Results are cached per prompt (LRU, bounded by entries and by bytes); the cache keeps only
the rows up to each prompt's true length (the rest is zero), so a short prompt costs kilobytes, not 8 MiB.

:func:`write_random_text_encoder` writes a seeded random encoder and a small offline-trained tokenizer in the
released on-disk layout, for tests and demos.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import html
import json
import re
import string
import threading
from collections import OrderedDict
from pathlib import Path

import ftfy
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer, UMT5Config, UMT5EncoderModel

from wanstream.core.errors import CheckpointError
from wanstream.models.checkpoints import T5_FILE, TOKENIZER_DIR, check_keys, read_torch_file

TEXT_LEN = 512
DEFAULT_CACHE_BYTES = 64 * 2**20   # prompt cache bound (a full 512-token fp32 prompt is 8 MiB)
EMBED_ALIAS = "encoder.embed_tokens.weight"

# Wan key (full match) → transformers key; the embedding is also aliased to EMBED_ALIAS.
_KEY_RULES = [(re.compile(pattern), repl) for pattern, repl in (
    (r"token_embedding\.weight", "shared.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"norm\.weight", "encoder.final_layer_norm.weight"),
)]


def umt5_config(vocab_size: int, d_model: int, num_heads: int, d_kv: int, d_ff: int, num_layers: int,
                relative_attention_num_buckets: int = 32) -> UMT5Config:
    """A ``UMT5Config`` with Wan's fixed settings (max distance 128, gated GELU, eps 1e-6, no dropout).

    transformers 5 forces ``tie_word_embeddings=True`` for the T5 family; for the encoder-only model that only
    ties ``encoder.embed_tokens`` to ``shared`` (there is no LM head), which is exactly Wan's single embedding.
    """
    return UMT5Config(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, d_kv=d_kv, d_ff=d_ff,
                      num_layers=num_layers, relative_attention_num_buckets=relative_attention_num_buckets,
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
                      dropout_rate=0.0)


T5_PRESETS: dict[str, UMT5Config] = {
    # d_model must stay 4096: it is the DiT's text_dim.
    "tiny": umt5_config(vocab_size=1024, d_model=4096, num_heads=2, d_kv=64, d_ff=256, num_layers=2),
    "umt5-xxl": umt5_config(vocab_size=256384, d_model=4096, num_heads=64, d_kv=64, d_ff=10240, num_layers=24),
}


# ----------------------------------------------------------------------------------------------- prompts
def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------------------------------------- keys
def convert_wan_t5_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan-named UMT5 encoder tensors → ``UMT5EncoderModel`` names (a new dict sharing the tensors).

    ``token_embedding.weight`` becomes both ``shared.weight`` and ``encoder.embed_tokens.weight``.
    Raises ValueError naming any key no rule covers.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        for rx, repl in _KEY_RULES:
            if match := rx.fullmatch(key):
                out[match.expand(repl)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unknown Wan UMT5 keys: {', '.join(sorted(unknown))}")
    if "shared.weight" in out:
        out[EMBED_ALIAS] = out["shared.weight"]
    return out


def wan_t5_shapes(config: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Wan-layout encoder file for ``config``, with its shape."""
    d, inner, f = config.d_model, config.num_heads * config.d_kv, config.d_ff
    shapes = {"token_embedding.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (d,), b + "norm2.weight": (d,),
            b + "attn.q.weight": (inner, d), b + "attn.k.weight": (inner, d), b + "attn.v.weight": (inner, d),
            b + "attn.o.weight": (d, inner),
            b + "pos_embedding.embedding.weight": (config.relative_attention_num_buckets, config.num_heads),
            b + "ffn.gate.0.weight": (f, d), b + "ffn.fc1.weight": (f, d), b + "ffn.fc2.weight": (d, f),
        })
    return shapes


def umt5_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "state dict") -> UMT5Config:
    """``UMT5Config`` whose dimensions are all read off the tensor shapes of a Wan-layout state dict."""
    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
        buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source}: not a Wan UMT5 encoder state dict (missing key {exc})") from exc
    except ValueError as exc:  # unpacking a tensor of the wrong rank
        raise CheckpointError(f"{source}: token_embedding / pos_embedding tensors must be 2-D ({exc})") from exc
    if inner % heads:
        raise CheckpointError(f"{source}: blocks.0.attn.q.weight rows ({inner}) are not a multiple of the "
                              f"{heads} heads given by blocks.0.pos_embedding.embedding.weight")
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    return umt5_config(vocab_size=vocab, d_model=d_model, num_heads=heads, d_kv=inner // heads, d_ff=d_ff,
                       num_layers=layers, relative_attention_num_buckets=buckets)


def build_umt5_encoder(wan_sd: dict[str, torch.Tensor], source: str, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """Strictly load a Wan-layout state dict into a ``UMT5EncoderModel`` (built on meta, weights assigned)."""
    config = umt5_config_from_state_dict(wan_sd, source)
    check_keys(wan_t5_shapes(config), wan_sd, source)
    sd = {k: v.to(device=device, dtype=dtype)
          for k, v in convert_wan_t5_to_transformers(wan_sd).items() if k != EMBED_ALIAS}
    sd[EMBED_ALIAS] = sd["shared.weight"]
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens = model.shared  # one Parameter, so moving the model never copies it twice
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{source}: tensors left uninitialised: {', '.join(on_meta)}")
    return model.eval().requires_grad_(False)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from a local folder (offline), with errors naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({exc})") from exc
    if tokenizer.pad_token_id is None:
        raise CheckpointError(f"{folder}: tokenizer has no pad token")
    return tokenizer


# -------------------------------------------------------------------------------------------- encoder
def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):   # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def return_freed_heap() -> None:
    """Give the heap pages freed by an encoder pass back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    An encoder pass on the CPU allocates and frees buffers of several MiB ([512, d_model] hidden states,
    attention maps); glibc serves them from its heap once one was freed (its mmap threshold adapts upwards), and
    the blocks that stay (cached prompts, a stream's prompt K/V) pin the holes between them, so each new prompt
    left a few MiB of free but unreturned memory (RSS grew without bound). A trim costs a few milliseconds,
    against tens to thousands for the pass itself.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class TextEncoder:
    """Prompts → ``[B, text_len, d_model]`` embeddings, zero after each prompt's true length, LRU-cached.

    ``device`` / ``dtype`` are where and how results are returned; the encoder itself may live elsewhere
    (:meth:`offload` parks it on the CPU, :meth:`to` moves it back). The cache holds at most ``cache_size``
    prompts and ``cache_bytes`` bytes; it stores each embedding only up to the prompt's true length and pads
    the returned copy. Thread-safe.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_len: int = TEXT_LEN, cache_size: int = 32, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_len = text_len
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()   # cleaned prompt → [length, d_model]
        self._cached_bytes = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_evictions = 0
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        """Embedding width (4096 for UMT5-XXL)."""
        return self.model.config.d_model

    @property
    def model_device(self) -> torch.device:
        """Where the encoder weights currently are."""
        return self.model.shared.weight.device

    def to(self, device: str | torch.device) -> "TextEncoder":
        """Move the encoder weights to ``device`` (outputs still go to ``self.device``)."""
        self.model.to(device)
        return self

    def offload(self) -> "TextEncoder":
        """Park the encoder on the CPU so it holds no accelerator memory while streaming."""
        return self.to("cpu")

    def limit_cache(self, max_bytes: int | None = None, max_entries: int | None = None) -> None:
        """Change the cache bounds (evicting the least recently used prompts now if needed)."""
        with self._lock:
            if max_bytes is not None:
                self.cache_bytes = int(max_bytes)
            if max_entries is not None:
                self.cache_size = int(max_entries)
            self._evict()

    def cache_info(self) -> dict:
        """Entries, bytes held, bounds and hit / miss / eviction counts of the prompt cache."""
        with self._lock:
            return {"entries": len(self._cache), "bytes": self._cached_bytes, "max_bytes": self.cache_bytes,
                    "max_entries": self.cache_size, "hits": self.cache_hits, "misses": self.cache_misses,
                    "evictions": self.cache_evictions}

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """``[B, text_len, d_model]`` embeddings in ``self.dtype`` on ``self.device``; cached prompts are free."""
        texts = [clean_prompt(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        unique = list(dict.fromkeys(texts))
        with self._lock:
            found = {t: self._cache[t] for t in unique if t in self._cache}
            self.cache_hits += len(found)
            new = [t for t in unique if t not in found]
            if new:
                self.cache_misses += len(new)
                found.update(zip(new, self._run(new)))
                if self.model_device.type == "cpu":
                    return_freed_heap()      # the pass's transient buffers (MiBs each) are free now
            for t in unique:
                self._store(t, found[t])
            self._evict()
        out = torch.zeros(len(texts), self.text_len, self.dim, device=self.device, dtype=self.dtype)
        for row, t in enumerate(texts):
            out[row, :found[t].shape[0]] = found[t]
        return out

    def _store(self, text: str, rows: torch.Tensor) -> None:
        if text in self._cache:
            self._cache.move_to_end(text)
            return
        self._cache[text] = rows
        self._cached_bytes += rows.nbytes

    def _evict(self) -> None:
        while self._cache and (len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes):
            _, rows = self._cache.popitem(last=False)
            self._cached_bytes -= rows.nbytes
            self.cache_evictions += 1

    def _run(self, texts: list[str]) -> list[torch.Tensor]:
        """One encoder pass over cleaned texts; one ``[length, d_model]`` tensor each (the rows of the prompt's
        true length, in their own compact storage)."""
        tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", max_length=self.text_len,
                                truncation=True, add_special_tokens=True, padding_side="right")
        device = self.model_device
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = tokens["attention_mask"].sum(1).tolist()
        return [hidden[i, :n].to(self.device, self.dtype, copy=True) for i, n in enumerate(lengths)]


def load_text_encoder(weights_path: str | Path, tokenizer_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, cache_size: int = 32,
                      text_len: int = TEXT_LEN, cache_bytes: int = DEFAULT_CACHE_BYTES) -> TextEncoder:
    """Load Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` + ``google/umt5-xxl`` tokenizer strictly."""
    weights_path = Path(weights_path)
    tokenizer = load_tokenizer(tokenizer_dir)
    sd = read_torch_file(weights_path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{weights_path}: expected a plain state dict of tensors")
    model = build_umt5_encoder(sd, str(weights_path), device, dtype)
    del sd
    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: tokenizer has {len(tokenizer)} tokens but {weights_path} "
                              f"embeds only {model.config.vocab_size}")
    return TextEncoder(model, tokenizer, device, dtype, text_len, cache_size, cache_bytes)


# -------------------------------------------------------------------------------------- random writer
_CORPUS = """
A cinematic shot of a red fox running through fresh snow in a quiet winter forest at sunrise.
An oil painting of a small village by the sea, with boats, waves, clouds and warm evening light.
A cute cat sitting on a wooden table next to a cup of coffee, soft focus, shallow depth of field.
A futuristic city at night with neon signs, rain on the street, reflections and flying cars.
A watercolor illustration of a girl with long hair walking in a field of yellow flowers.
Anime style, a boy riding a bicycle along a river under a blue sky with white clouds.
A realistic portrait of an old man with a grey beard, dramatic lighting, high detail, sharp.
Studio Ghibli style landscape with green hills, tall trees, a small house and a winding road.
A dog playing with a ball on the beach, golden hour, slow motion, photorealistic, 4k video.
Van Gogh style starry night over mountains and a lake, thick brush strokes, vivid colors.
A person dancing in a dark room lit by colorful lights, smoke, music video, dynamic camera.
Pixel art of a castle on a cliff, dragons flying around, fantasy game, bright palette.
A black and white photograph of a busy street in an old town, people walking, vintage film grain.
Cyberpunk woman wearing a leather jacket and glasses, glowing eyes, detailed face, moody.
A close up of a flower opening in the morning, dew drops, macro lens, natural light.
Claymation style character waving hello in a colorful kitchen, playful and smooth animation.
A horse galloping across a desert with sand dunes, wind, dust, wide angle, epic scene.
Comic book style superhero standing on a rooftop above the city, bold lines, strong shadows.
Low poly 3D render of a forest with deer and birds, pastel colors, calm and peaceful mood.
A spaceship flying past a giant planet with rings, stars, nebula, science fiction, ultra wide.
Impressionist painting of a garden with a pond, water lilies, a bridge and soft sunlight.
Lego style figure walking in a toy town, bright plastic bricks, stop motion, fun and happy.
The camera slowly moves forward into a cave filled with crystals that glow blue and purple.
A chef cooking in a restaurant kitchen, fire in the pan, steam, fast cuts, high quality.
Make the scene look like a pencil sketch on paper, clean outlines, light shading, simple.
Turn the person into a marble statue in a museum hall, white stone, soft light, elegant.
Winter, summer, autumn, spring; morning, noon, evening, night; one, two, three, four, five.
"""
_TOKENIZER_VOCAB = 1000


def write_random_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Train a small T5-style Unigram tokenizer on a built-in English corpus and save it to ``folder``.

    ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2; loads offline with ``AutoTokenizer``.
    """
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # as T5Tokenizer sets it
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(
        vocab_size=_TOKENIZER_VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    vocab = [(piece, score) for piece, score in json.loads(tokenizer.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0)
    t5.save_pretrained(str(folder))
    return t5


def write_random_text_encoder(folder: str | Path, preset: str, seed: int = 0) -> Path:
    """Write ``folder/models_t5_umt5-xxl-enc-bf16.pth`` (Wan key names, bf16, seeded random) and the
    ``folder/google/umt5-xxl/`` tokenizer; returns the weights path.

    Presets: ``tiny`` (d_model 4096, 2 layers, 2 heads × 64, d_ff 256, 1024 rows; about 30 MB) and
    ``umt5-xxl`` (the released dims, 5.68B params, about 11.4 GB). Linear weights and relative biases
    ~ N(0, 0.02²), the token embedding ~ N(0, 1) (T5's init), norm scales ~ 1 + N(0, 0.05²).
    """
    if preset not in T5_PRESETS:
        raise ValueError(f"text encoder preset must be one of {sorted(T5_PRESETS)}, got {preset!r}")
    config = T5_PRESETS[preset]
    folder = Path(folder)
    (folder / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    tokenizer = write_random_tokenizer(folder / TOKENIZER_DIR)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the {config.vocab_size} embedding rows")
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in wan_t5_shapes(config).items():
        t = torch.randn(shape, generator=gen, dtype=torch.bfloat16)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key == "norm.weight":
            t = t.mul_(0.05).add_(1.0)
        elif key != "token_embedding.weight":
            t = t.mul_(0.02)
        sd[key] = t
    path = folder / T5_FILE
    torch.save(sd, path)
    return path
