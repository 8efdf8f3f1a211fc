"""A Unigram tokenizer served by SentencePiece: the same ids as its tokenizer.json, in a quarter of the heap.

The Rust ``tokenizers`` library keeps a Unigram vocabulary in a trie of hash maps: the 104 k pieces of
multilingual-e5-small take ~82 MB of heap, the largest single part of a 512 MB instance after the
weights and the vectors. SentencePiece, the library those vocabularies were trained with, keeps the
same pieces and scores in a double-array trie (~21 MB) and runs the same Viterbi.

``model prepare`` calls ``write_beside`` on the artifact it builds. When the tokenizer.json's pipeline
is one this module reproduces (``Replace``/Unicode-form normalizers, a ``Metaspace`` pre-tokenizer that
splits on it, ``<s> $A </s>`` around a Unigram model without byte fallback) it writes
``tokenizer.model`` (SentencePiece's own format) and ``tokenizer.spm.json`` (the normalizers and
special tokens, which SentencePiece is told to leave alone), and keeps them only if both tokenizers
give the same ids for every probe text (``PROBE_TEXTS`` plus random strings over the vocabulary's own
characters, specials and odd spaces included). Otherwise the artifact keeps tokenizer.json alone and
says why. The encoder loads ``tokenizer.model`` when it is there (``load``), tokenizer.json when not.

Only ``prepare`` needs protobuf (to write the model file); serving needs the ``sentencepiece`` wheel alone.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MODEL_FILE = "tokenizer.model"
SPEC_FILE = "tokenizer.spm.json"
METASPACE = "\u2581"
UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}

# Texts every translation must split exactly as tokenizer.json does, beside the random ones.
PROBE_TEXTS = (
    "", " ", "  ", "\u2581", "\t\n", "שלום", " שלום עולם ", "עכבר אלחוטי לבית ולמשרד", "מה השעה?",
    "הספרים שבספרייה", "ירושלים של זהב", "Hello, world!", "The quick brown fox 123", "₪ 49.90 בלבד",
    "שָׁלוֹם עֲלֵיכֶם", "ﬠﬡﬢ", "a  b\u00a0c\u2003d", "<s>", "x<s>y", "hello </s> world <mask>", "<unk>",
    "query: איך מכינים קפה", "passage: מכונת קפה ביתית", "e\u0301té", "ＡＢＣ １２３", "\ufeffבית\u200fספר",
)


class TranslateError(ValueError):
    """tokenizer.json's pipeline is not one SentencePiece can reproduce here; the message says what."""


@dataclass(frozen=True)
class Encoding:
    """The part of a ``tokenizers`` Encoding the encoder reads."""

    ids: list[int]


def _python_regex(pattern: str) -> str:
    """An Oniguruma pattern of tokenizers' ``Regex`` in Python's syntax (its ``\\x{HEX}`` escapes)."""
    return re.sub(r"\\x\{([0-9a-fA-F]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", pattern)


def _normalizer_steps(normalizer: dict | None) -> list[dict]:
    """The normalizers as a flat list of steps this module runs, or TranslateError."""
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        return [step for inner in normalizer["normalizers"] for step in _normalizer_steps(inner)]
    kind = normalizer.get("type")
    if kind in UNICODE_FORMS:
        return [{"form": kind}]
    if kind == "Replace":
        pattern = normalizer["pattern"]
        regex = _python_regex(pattern["Regex"]) if "Regex" in pattern else re.escape(pattern["String"])
        re.compile(regex)
        return [{"regex": regex, "content": normalizer["content"]}]
    raise TranslateError(f"normalizer {kind!r} is not reproduced")


def _check_pipeline(data: dict) -> None:
    model, pre, post = data.get("model") or {}, data.get("pre_tokenizer") or {}, data.get("post_processor") or {}
    if model.get("type") != "Unigram" or model.get("byte_fallback"):
        raise TranslateError(f"model {model.get('type')!r} (byte fallback {model.get('byte_fallback')}) is not a "
                             f"plain Unigram")
    if (pre.get("type"), pre.get("replacement"), pre.get("prepend_scheme"), pre.get("split")) != \
            ("Metaspace", METASPACE, "always", True):
        raise TranslateError(f"pre-tokenizer {pre!r} is not Metaspace splitting on {METASPACE!r}, always prepended")
    single = post.get("single") or []
    shape = [("SpecialToken" if "SpecialToken" in step else "Sequence") for step in single]
    if post.get("type") != "TemplateProcessing" or shape != ["SpecialToken", "Sequence", "SpecialToken"]:
        raise TranslateError("post-processor is not `<s> $A </s>`")
    inside = [piece for piece, _ in model["vocab"] if METASPACE in piece[1:]]
    if inside:
        raise TranslateError(f"{len(inside)} pieces hold {METASPACE!r} after their first character, e.g. {inside[0]!r}")


def translate(data: dict) -> tuple[bytes, dict]:
    """(SentencePiece model bytes, spec) for a parsed tokenizer.json, or TranslateError."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    _check_pipeline(data)
    model = data["model"]
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    for token in data.get("added_tokens", []):
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise TranslateError(f"added token {token['content']!r} has matching options this module does not run")
        if model["vocab"][token["id"]][0] != token["content"]:
            raise TranslateError(f"added token {token['content']!r} is not piece {token['id']} of the vocabulary")
    single = data["post_processor"]["single"]
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.vocab_size = len(model["vocab"])
    proto.trainer_spec.unk_id = model["unk_id"]
    proto.trainer_spec.bos_id = proto.trainer_spec.eos_id = proto.trainer_spec.pad_id = -1
    # The normalizers run in Python (spec "normalizers"): SentencePiece only escapes spaces and adds the prefix.
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    kinds = pb.ModelProto.SentencePiece
    for index, (piece, score) in enumerate(model["vocab"]):
        entry = proto.pieces.add(piece=piece, score=score)
        entry.type = kinds.UNKNOWN if index == model["unk_id"] else (
            kinds.CONTROL if piece in specials else kinds.NORMAL)
    spec = {
        "normalizers": _normalizer_steps(data.get("normalizer")),
        "specials": specials,
        "bos": specials[single[0]["SpecialToken"]["id"]],
        "eos": specials[single[2]["SpecialToken"]["id"]],
        "metaspace_id": next((i for i, (p, _) in enumerate(model["vocab"]) if p == METASPACE), model["unk_id"]),
    }
    return proto.SerializeToString(), spec


class SentencePieceTokenizer:
    """tokenizer.json's splitting run by SentencePiece, with the ``tokenizers`` calls the encoder makes."""

    def __init__(self, model: Path | bytes, spec: dict):
        import sentencepiece

        self._sp = (sentencepiece.SentencePieceProcessor(model_proto=model) if isinstance(model, bytes)
                    else sentencepiece.SentencePieceProcessor(model_file=str(model)))
        self._steps = [(re.compile(s["regex"]), s["content"]) if "regex" in s else s["form"]
                       for s in spec["normalizers"]]
        self._specials = spec["specials"]
        # tokenizers matches special tokens in the raw text before normalizing, longest first.
        names = sorted(self._specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._bos, self._eos, self._metaspace = spec["bos"], spec["eos"], spec["metaspace_id"]
        self._max_length: int | None = None

    def no_padding(self) -> None:
        """Batches are padded by the encoder (run_session)."""

    def enable_truncation(self, max_length: int) -> None:
        self._max_length = max_length

    def _normalized(self, text: str) -> str:
        for step in self._steps:
            text = unicodedata.normalize(step, text) if isinstance(step, str) else step[0].sub(step[1], text)
        return text

    def _pieces(self, segment: str) -> list[int]:
        text = self._normalized(segment)
        if not text:
            return []
        # Metaspace prepends U+2581 unless the text starts with (an escaped) space; SentencePiece always does.
        if text.startswith(" "):
            text = text[1:]
            if not text:
                return [self._metaspace]
        return self._sp.encode(text)

    def encode(self, text: str) -> Encoding:
        ids: list[int] = []
        for index, segment in enumerate(self._split.split(text) if self._split else [text]):
            ids += [self._specials[segment]] if index % 2 else self._pieces(segment)
        if self._max_length is not None:
            ids = ids[: max(self._max_length - 2, 0)]
        return Encoding([self._bos, *ids, self._eos])

    def encode_batch(self, texts: Sequence[str]) -> list[Encoding]:
        return [self.encode(text) for text in texts]


def probe_texts(vocab: Sequence[Sequence], specials: Sequence[str], count: int = 3000, seed: int = 7) -> list[str]:
    """PROBE_TEXTS and random strings over the vocabulary's characters, spaces, controls and specials."""
    rnd = random.Random(seed)
    chars = sorted({c for piece, _ in vocab for c in piece if c != METASPACE})
    odd = [" ", " ", " ", "\t", "\n", "\u00a0", "\u2003", "\u200f", "\ufeff", "\x01", METASPACE, "\u4e2d", "\U0001f600"]
    texts = list(PROBE_TEXTS)
    for _ in range(count):
        parts = [rnd.choice(chars) if rnd.random() < 0.8 else rnd.choice(odd) for _ in range(rnd.randint(0, 30))]
        if specials and rnd.random() < 0.1:
            parts.insert(rnd.randint(0, len(parts)), rnd.choice(specials))
        texts.append("".join(parts))
    return texts


def write_beside(folder: Path) -> str:
    """Write tokenizer.model and tokenizer.spm.json beside folder's tokenizer.json when SentencePiece splits
    every probe text as it does; returns what was done, for the preparer's output."""
    from tokenizers import Tokenizer

    source = folder / "tokenizer.json"
    data = json.loads(source.read_text(encoding="utf-8"))
    for stale in (MODEL_FILE, SPEC_FILE):
        (folder / stale).unlink(missing_ok=True)
    try:
        model, spec = translate(data)
    except TranslateError as exc:
        return f"tokenizer: tokenizer.json kept alone ({exc})"
    try:
        ours = SentencePieceTokenizer(model, spec)
    except RuntimeError as exc:  # SentencePiece's own checks, e.g. a piece written twice
        return f"tokenizer: tokenizer.json kept alone (SentencePiece refuses the vocabulary: {exc})"
    reference = Tokenizer.from_file(str(source))
    reference.no_padding()
    reference.no_truncation()
    texts = probe_texts(data["model"]["vocab"], list(spec["specials"]))
    for text in texts:
        if reference.encode(text).ids != ours.encode(text).ids:
            return f"tokenizer: tokenizer.json kept alone (SentencePiece splits {text!r} otherwise)"
    (folder / MODEL_FILE).write_bytes(model)
    (folder / SPEC_FILE).write_text(json.dumps(spec, ensure_ascii=False, indent=1), encoding="utf-8")
    return f"tokenizer: {MODEL_FILE} written (SentencePiece, the same ids on {len(texts)} probe texts)"


def load(folder: Path) -> SentencePieceTokenizer | None:
    """The folder's SentencePiece tokenizer, or None when it has none (tokenizer.json is then used)."""
    model, spec = folder / MODEL_FILE, folder / SPEC_FILE
    if not (model.exists() and spec.exists()):
        return None
    return SentencePieceTokenizer(model, json.loads(spec.read_text(encoding="utf-8")))
