"""``flask --app app model prepare``: a sentence-transformers model -> a compact ONNX artifact.

Run at build time (Dockerfile builder stage, ``make model``), never in a web worker: it imports
torch, transformers and onnxruntime's quantisation tools. The artifact holds

* ``model.onnx``: the transformer with pooling and L2 normalisation inside the graph, so serving
  needs only onnxruntime and tokenizers (no torch: ~220 MB less per process);
* ``tokenizer.json``: the fast tokenizer, read by the Rust ``tokenizers`` library;
* ``memfit_model.json``: the manifest (format, precision, dim, fingerprint).

Precisions, judged by top-5 retrieval agreement with fp32 on real weights (README "Performance"):
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
from pathlib import Path

from .encoders import ARTIFACT_FORMAT, ARTIFACT_MANIFEST, ModelError, _weights_files, fingerprint_files, \
    read_layout, resolve_model_dir

OPSET = 20
Q8_BLOCK_SIZE = 32


class PrepareError(RuntimeError):
    """The model cannot be prepared; the message says why."""


def prepare(source: str, output: Path, precision: str = "q8", max_seq_length: int = 128,
            force: bool = False) -> dict:
    output = Path(output)
    if output.exists() and not force:
        raise PrepareError(f"{output} exists; pass --force to replace it")
    try:
        root = resolve_model_dir(source)
        layout = read_layout(root)
    except ModelError as exc:
        raise PrepareError(str(exc)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        started = time.perf_counter()
        dim, pad_id = _export(layout, work / "fp32.onnx", work / "tokenizer.json")
        _quantize(work / "fp32.onnx", work / "model.onnx", precision)
        (work / "fp32.onnx").unlink(missing_ok=True)
        source_fp = fingerprint_files(
            [p for p in (layout.transformer_dir / "config.json", root / "modules.json") if p.exists()]
            + _weights_files(layout.transformer_dir),
            {"pooling": layout.pooling},
        )
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": 1,
            "source": source,
            "precision": precision,
            "dim": dim,
            "pooling": layout.pooling,
            "max_seq_length": min(filter(None, (layout.max_seq_length, max_seq_length))),
            "pad_id": pad_id,
            "fingerprint": fingerprint_files([work / "model.onnx"], {"source": source_fp, "precision": precision}),
            "prepare_seconds": round(time.perf_counter() - started, 1),
        }
        (work / ARTIFACT_MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        _swap_into_place(work, output)
        return manifest
    except PrepareError:
        raise
    except Exception as exc:
        raise PrepareError(f"preparing {source} failed: {type(exc).__name__}: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            if pooling == "cls":
                vectors = hidden[:, 0]
            elif pooling == "max":
                vectors = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
            else:
                vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vectors, p=2, dim=1)

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
