"""Sentence encoders behind one small interface, chosen by what the model folder holds.

* A folder prepared by ``flask --app app model prepare`` (it has ``memfit_model.json``) is served by
  ONNX Runtime with the Rust ``tokenizers``: no torch in the process. This is the production path.
* Any other folder, or a hub name, is read as a sentence-transformers model and served by
  ``transformers`` plus the pooling from its ``modules.json``, without importing
  ``sentence_transformers`` (which drags sklearn, scipy and sympy: ~190 MB of RSS for nothing).

This module is imported only by the loader (``SemanticService.encoder``); it is the one place
where numpy, onnxruntime, torch and transformers are imported, always inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from ..settings import Settings

log = logging.getLogger(__name__)

ARTIFACT_MANIFEST = "memfit_model.json"
ARTIFACT_FORMAT = "memfit-onnx"
POOLING_MODES = ("mean", "cls", "max")


class ModelError(RuntimeError):
    """The model folder or name cannot be served; the message says what is wrong with it."""


class Encoder(Protocol):
    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int) -> "np.ndarray":  # noqa: F821
        """L2-normalised float32 embeddings, one row per text."""

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class SentenceTransformerLayout:
    """What memfit needs from a sentence-transformers folder (either the v2-v5 or the v6 layout)."""

    root: Path
    transformer_dir: Path
    pooling: str
    max_seq_length: int | None
    normalize: bool


def read_layout(root: Path) -> SentenceTransformerLayout:
    """Read modules.json and the pooling config; a plain transformers folder means mean pooling."""
    modules_file = root / "modules.json"
    if not modules_file.exists():
        if (root / "config.json").exists():
            return SentenceTransformerLayout(root, root, "mean", None, True)
        raise ModelError(f"{root} has neither modules.json nor config.json: not a sentence-transformers model")
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        transformer = next(m for m in modules if m["type"].endswith("Transformer"))
        pooling_module = next((m for m in modules if m["type"].endswith("Pooling")), None)
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ModelError(f"{modules_file} is not a valid modules.json ({exc})") from None
    unsupported = [m["type"] for m in modules if not m["type"].endswith(("Transformer", "Pooling", "Normalize"))]
    if unsupported:
        raise ModelError(f"unsupported sentence-transformers modules: {', '.join(unsupported)}")
    pooling = "mean"
    if pooling_module is not None:
        config = _read_json(root / pooling_module["path"] / "config.json")
        pooling = _pooling_mode(config)
    transformer_dir = root / transformer.get("path", "")
    st_config = _read_json(transformer_dir / "sentence_bert_config.json", missing_ok=True)
    max_len = st_config.get("max_seq_length")
    if max_len is None:
        max_len = _read_json(transformer_dir / "tokenizer_config.json", missing_ok=True).get("model_max_length")
    if not isinstance(max_len, int) or max_len > 100_000:  # tokenizers write 1e30 for "no limit"
        max_len = None
    return SentenceTransformerLayout(root, transformer_dir, pooling, max_len, True)


def _pooling_mode(config: dict) -> str:
    if "pooling_mode" in config:  # sentence-transformers >= 6
        mode = str(config["pooling_mode"]).lower()
    else:
        flags = [name for name in ("cls_token", "mean_tokens", "max_tokens") if config.get(f"pooling_mode_{name}")]
        other = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k[13:] not in
                 ("cls_token", "mean_tokens", "max_tokens")]
        if len(flags) != 1 or other:
            raise ModelError(f"unsupported pooling configuration: {config}")
        mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[flags[0]]
    if mode not in POOLING_MODES:
        raise ModelError(f"unsupported pooling mode {mode!r}: accepts {', '.join(POOLING_MODES)}")
    return mode


def _read_json(path: Path, missing_ok: bool = False) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ModelError(f"{path} is missing") from None
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc})") from None


def resolve_model_dir(name: str) -> Path:
    """A local folder as is; otherwise a hub name, fetched into (or read from) the local HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ModelError(f"{name!r} is neither a model folder nor a hub name like 'owner/model'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name))
    except Exception as exc:  # offline, unknown repo, no permission: one clear reason
        raise ModelError(f"cannot fetch {name!r} from the Hugging Face hub ({type(exc).__name__})") from None


def fingerprint_files(paths: Sequence[Path], extra: dict) -> str:
    """sha256 over the served files' bytes and the encoding settings: a new model, new vectors."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _weights_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{root} holds no model weights (*.safetensors or pytorch_model.bin)")
    return files


def available_cpus() -> int:
    """CPUs this process may really use: its affinity, capped by a cgroup CPU quota (0.5 CPU -> 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = None
    try:  # cgroup v2: "max 100000" or "50000 100000"
        limit, period = open("/sys/fs/cgroup/cpu.max").read().split()
        quota = None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1
            limit = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
            period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
            quota = limit / period if limit > 0 else None
        except (OSError, ValueError):
            pass
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def runtime_threads(settings: Settings) -> int:
    """SEMANTIC_THREADS, or with 0 ("auto") the available CPUs shared among the workers (1 to 4):
    two workers with two threads each on two cores would only fight over them."""
    return settings.semantic_threads or max(1, min(4, available_cpus() // settings.web_concurrency))


def _batches(texts: Sequence[str], size: int):
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


class TorchEncoder:
    """transformers + pooling, imported here only; the development and 1 GB full-precision path."""

    backend = "torch"

    def __init__(self, root: Path, settings: Settings):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(runtime_threads(settings))
        layout = read_layout(root)
        self.layout = layout
        self.max_seq_length = min(filter(None, (layout.max_seq_length, settings.semantic_max_seq_length)))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(layout.transformer_dir))
            # low_cpu_mem_usage keeps transformers from building a random-initialised copy first.
            self.model = AutoModel.from_pretrained(str(layout.transformer_dir), low_cpu_mem_usage=True)
        except Exception as exc:
            raise ModelError(f"cannot load {layout.transformer_dir}: {type(exc).__name__}: {exc}") from None
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        files = [p for p in (layout.transformer_dir / "config.json", root / "modules.json") if p.exists()]
        self.fingerprint = fingerprint_files(
            files + _weights_files(layout.transformer_dir),
            {"pooling": layout.pooling, "max_seq_length": self.max_seq_length, "backend": "torch"},
        )
        self._torch = torch

    def encode(self, texts: Sequence[str], batch_size: int):
        import numpy as np

        torch = self._torch
        out = []
        with torch.inference_mode():
            for batch in _batches(list(texts), batch_size):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_seq_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                out.append(pool(hidden.numpy(), enc["attention_mask"].numpy(), self.layout.pooling))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": "fp32", "dim": self.dim, "threads": torch_threads(self._torch),
                "max_seq_length": self.max_seq_length, "fingerprint": self.fingerprint[:12]}


def torch_threads(torch) -> int:
    return int(torch.get_num_threads())


def pool(hidden, mask, mode: str):
    """Pool token vectors (batch, tokens, dim) into L2-normalised sentence vectors, as the library does."""
    import numpy as np

    hidden = hidden.astype(np.float32, copy=False)
    mask = mask.astype(np.float32)[:, :, None]
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = np.where(mask > 0, hidden, -1e9).max(axis=1)
    else:
        vectors = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.clip(norms, 1e-12, None)).astype(np.float32)


class OnnxEncoder:
    """ONNX Runtime + tokenizers over an artifact made by ``model prepare``; pooling is in the graph."""

    backend = "onnxruntime"

    def __init__(self, root: Path, settings: Settings):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = _read_json(root / ARTIFACT_MANIFEST)
        if manifest.get("format") != ARTIFACT_FORMAT:
            raise ModelError(f"{root / ARTIFACT_MANIFEST} is not a {ARTIFACT_FORMAT} manifest")
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.max_seq_length = min(int(manifest["max_seq_length"]), settings.semantic_max_seq_length)
        self.fingerprint = hashlib.sha256(
            f"{manifest['fingerprint']}:{self.max_seq_length}".encode()
        ).hexdigest()
        try:
            self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as exc:
            raise ModelError(f"cannot read {root / 'tokenizer.json'}: {exc}") from None
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.tokenizer.enable_padding(pad_id=int(manifest.get("pad_id", 0)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = runtime_threads(settings)
        options.inter_op_num_threads = 1
        # The CPU arena keeps the largest batch's buffers for ever; without it peaks fall back.
        options.enable_cpu_mem_arena = False
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(root / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"cannot load {root / 'model.onnx'}: {type(exc).__name__}: {exc}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.threads = options.intra_op_num_threads

    def encode(self, texts: Sequence[str], batch_size: int):
        import numpy as np

        out = []
        for batch in _batches(list(texts), batch_size):
            encodings = self.tokenizer.encode_batch(batch)
            feed = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            }
            if "token_type_ids" in self.input_names:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            out.append(self.session.run(["sentence_embedding"], feed)[0].astype(np.float32, copy=False))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    def describe(self) -> dict:
        return {"backend": self.backend, "precision": self.manifest.get("precision"), "dim": self.dim,
                "threads": self.threads,
                "max_seq_length": self.max_seq_length, "fingerprint": self.fingerprint[:12]}


def load_encoder(settings: Settings) -> Encoder:
    """Resolve SEMANTIC_MODEL and build the encoder its folder calls for."""
    root = resolve_model_dir(settings.semantic_model)
    if (root / ARTIFACT_MANIFEST).exists():
        encoder: Encoder = OnnxEncoder(root, settings)
    else:
        encoder = TorchEncoder(root, settings)
    _trim_heap()
    return encoder


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS after a load (glibc keeps them otherwise)."""
    if os.name != "posix":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        pass
