"""The remote encoder: an embedding service computes the vectors (SEMANTIC_BACKEND=remote).

The instance then loads no model weights at all; a service it does not control answers instead, so
every call is guarded as a dependency that can fail:

* connect and read timeouts on each request (SEMANTIC_REMOTE_CONNECT_TIMEOUT / _READ_TIMEOUT);
* bounded retries with full jitter (AWS' "exponential backoff and jitter") for connection failures,
  timeouts, 429 and 5xx: embedding the same texts twice is harmless;
* a circuit breaker per process: SEMANTIC_REMOTE_BREAKER_FAILURES consecutive failed requests open it,
  and while it is open every call fails at once with the reason (semantic search answers 503, hybrid
  answers with text alone, the background embedder waits) instead of each paying the timeouts; after
  SEMANTIC_REMOTE_BREAKER_COOLDOWN seconds one request is let through (half-open) and its outcome
  closes or re-opens it.

The outage is logged at ERROR once per instance (a marker file in the instance's shared folder: the
first worker whose breaker opens claims it), so Sentry's logging integration raises one alert per
outage, not one per request or per worker; the recovery is logged at INFO.

The texts get the same prompts as the local model's (e5's "query: " / "passage: ") and the vectors the
same L2 normalisation, so a remote copy of a model gives the vectors the local one would. The
fingerprint stored beside the vectors names the protocol, the model, its prompts and the dimension a
probe embedding answered, so another model means new vectors, never a mix.
Only the standard library and urllib3 (already there for Sentry's SDK) are imported at module level;
numpy, for the vectors, inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from ..settings import Settings, public_url
from .encoders import ModelError, with_prompt
from .unavailable import SemanticUnavailable

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
BREAKER_STATES = (CLOSED, HALF_OPEN, OPEN)  # the gauge's value is the index: 0 closed, 1 half-open, 2 open
PROBE_TEXT = "בדיקה"  # "a check": the probe embedding that tells the service's dimension
BACKOFF_BASE_S, BACKOFF_MAX_S = 0.2, 2.0  # a retry waits a random time up to base x 2^attempt, capped
# Characters per token for the request bound: Hebrew and English wordpieces average 3-4 characters, so a
# third over-counts a little, which keeps a request under the service's token limit.
CHARS_PER_TOKEN = 3
TOKENS_PER_TEXT = 2  # the [CLS] and [SEP] every text gets
# A marker older than this is a leftover of a process that died mid-outage, not an outage still on.
OUTAGE_MARKER_STALE_S = 6 * 3600
OUTAGE_MARKER = "semantic-remote-outage"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class RemoteUnavailable(SemanticUnavailable):
    """The embedding service cannot answer now (down, slow, refusing, or the breaker is open).

    ``retry_load_after``: how soon the service may try loading the encoder again (the breaker's cool-down,
    not the five minutes a broken local model waits)."""

    def __init__(self, message: str, retry_load_after: float):
        super().__init__(message)
        self.retry_load_after = retry_load_after


class _Failure(Exception):
    """One request failed; ``retry`` says whether another try may succeed."""

    def __init__(self, reason: str, retry: bool):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def estimated_tokens(text: str) -> int:
    """A text's tokens, estimated from its characters: the service's tokenizer is not here."""
    return len(text) // CHARS_PER_TOKEN + TOKENS_PER_TEXT


def token_bounded_batches(texts: Sequence[str], count: int, tokens: int) -> list[range]:
    """Consecutive ranges of at most ``count`` texts and about ``tokens`` tokens (estimated from characters);
    a text over the bound on its own still gets a batch of one (the service truncates it)."""
    batches, start, used = [], 0, 0
    for i, text in enumerate(texts):
        cost = estimated_tokens(text)
        if i > start and (i - start >= count or used + cost > tokens):
            batches.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(texts):
        batches.append(range(start, len(texts)))
    return batches


class Breaker:
    """A circuit breaker: closed, open after ``threshold`` consecutive failures, half-open after ``cooldown``
    seconds (one probe call at a time), closed again by a success. Thread-safe; ``on_change(old, new,
    reason)`` is called outside the lock on every change of state."""

    def __init__(self, threshold: int, cooldown: float, on_change: Callable[[str, str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.threshold, self.cooldown, self._on_change, self._clock = threshold, cooldown, on_change, clock
        self._lock = threading.Lock()
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.last_error = ""
        self._probing = False

    def allow(self) -> None:
        """Let a call through, or raise RemoteUnavailable while open (and while a half-open probe runs)."""
        with self._lock:
            if self.state == CLOSED:
                return
            left = self.cooldown - (self._clock() - self.opened_at)
            if self.state == OPEN and left <= 0:
                self.state, self._probing, changed = HALF_OPEN, True, True
            elif self.state == HALF_OPEN and not self._probing:
                self._probing, changed = True, False
            else:
                raise RemoteUnavailable(f"the embedding service is unavailable ({self.last_error}); the next "
                                        f"try is in {max(left, 0):.0f} s", retry_load_after=max(left, 0.0))
        if changed:
            self._changed(OPEN, HALF_OPEN, "cool-down over: one probe request")

    def success(self) -> None:
        with self._lock:
            old, self.state, self.failures, self._probing = self.state, CLOSED, 0, False
        if old != CLOSED:
            self._changed(old, CLOSED, "a request succeeded")

    def failure(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_error = reason
            old = self.state
            if old == HALF_OPEN or (old == CLOSED and self.failures >= self.threshold):
                self.state, self.opened_at = OPEN, self._clock()
            self._probing = False
            new = self.state
        if new != old:
            self._changed(old, new, reason)

    def _changed(self, old: str, new: str, reason: str) -> None:
        if self._on_change is not None:
            try:
                self._on_change(old, new, reason)
            except Exception:  # noqa: BLE001 -- reporting must never break the call it reports on
                log.debug("breaker change hook failed", exc_info=True)


class OutageReport:
    """Says an outage once per instance: the first worker whose breaker opens claims a marker file in the
    shared folder and logs at ERROR (Sentry's alert); the others log at WARNING. The worker whose breaker
    closes first removes it and logs the recovery at INFO."""

    def __init__(self, folder: str, url: str):
        self.path = Path(folder) / OUTAGE_MARKER
        self.url = url

    def __call__(self, old: str, new: str, reason: str) -> None:
        _set_breaker_gauge(new)
        if new == OPEN and old == CLOSED:
            level = logging.ERROR if self._claim() else logging.WARNING
            log.log(level, "embedding service %s is unavailable (%s): semantic search answers 503 and hybrid "
                    "answers with text alone until it is back", self.url, reason)
        elif new == CLOSED:
            if self._release():
                log.info("embedding service %s is back: semantic search answers again", self.url)
        elif new == HALF_OPEN:
            log.debug("embedding service %s: %s", self.url, reason)

    def _claim(self) -> bool:
        try:
            if time.time() - self.path.stat().st_mtime > OUTAGE_MARKER_STALE_S:
                self.path.unlink()
        except OSError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError:  # no shared folder to write: report from this worker
            return True
        os.close(fd)
        return True

    def _release(self) -> bool:
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError:
            return True


def remote_prompts(settings: Settings) -> dict[str, str]:
    """The prompts set for the remote model; with neither set, those of SEMANTIC_MODEL's local folder, so
    that a remote copy of the model the image ships is prompted as the local one is."""
    set_ = {"query": settings.semantic_remote_query_prompt, "passage": settings.semantic_remote_passage_prompt}
    if any(set_.values()):
        return {kind: prompt for kind, prompt in set_.items() if prompt}
    return _local_model_facts(settings)[0]


def expected_dim(settings: Settings) -> int | None:
    """SEMANTIC_REMOTE_DIM, else the dimension of SEMANTIC_MODEL's local folder, else None (not checked)."""
    return settings.semantic_remote_dim or _local_model_facts(settings)[1]


def _local_model_facts(settings: Settings) -> tuple[dict[str, str], int | None]:
    """(prompts, dim) of SEMANTIC_MODEL when it is a local artifact or sentence-transformers folder; its
    small JSON files only, never its weights."""
    from .encoders import ARTIFACT_MANIFEST, manifest_prompts, read_layout, read_manifest

    root = Path(settings.semantic_model).expanduser()
    if not root.is_dir():
        return {}, None
    try:
        if (root / ARTIFACT_MANIFEST).exists():
            manifest = read_manifest(root)
            return manifest_prompts(root, manifest), int(manifest["dim"])
        layout = read_layout(root)
        config = json.loads((layout.transformer_dir / "config.json").read_text(encoding="utf-8"))
        return layout.prompts, config.get("hidden_size")
    except (ModelError, OSError, ValueError, KeyError) as exc:
        raise ModelError(f"SEMANTIC_MODEL={root} was read for the remote model's prompts and dimension and "
                         f"cannot be: {exc}") from None


class RemoteEncoder:
    """The Encoder of an embedding service (TEI's /embed or an OpenAI-compatible /embeddings).

    Built by the semantic service: one probe embedding tells the dimension, checked against the expected one."""

    backend = "remote"

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        import urllib3

        self.settings = settings
        self.protocol = settings.semantic_remote_protocol
        self.model = settings.semantic_remote_model
        self.url = public_url(settings.semantic_remote_url)
        self._endpoint = settings.semantic_remote_url + ("/embed" if self.protocol == "tei" else "/embeddings")
        self.prompts = remote_prompts(settings)
        self._headers = {"Content-Type": "application/json"}
        if settings.semantic_remote_token:
            self._headers["Authorization"] = f"Bearer {settings.semantic_remote_token}"
        self._http = urllib3.PoolManager(
            num_pools=1, maxsize=4, retries=False,
            timeout=urllib3.Timeout(connect=settings.semantic_remote_connect_timeout,
                                    read=settings.semantic_remote_read_timeout))
        self.breaker = Breaker(settings.semantic_remote_breaker_failures, settings.semantic_remote_breaker_cooldown,
                               OutageReport(settings.shared_folder, self.url), clock=clock)
        _set_breaker_gauge(CLOSED)
        self.dim = 0
        self.dim = int(self.encode([PROBE_TEXT], 1, kind="query").shape[1])
        expected = expected_dim(settings)
        if expected and expected != self.dim:
            raise ModelError(f"the embedding service's model {self.model!r} answers {self.dim}-dimensional vectors, "
                             f"and {expected} were expected (SEMANTIC_REMOTE_DIM, or SEMANTIC_MODEL's folder): "
                             f"another model than the one meant is served")
        described = {"backend": "remote", "protocol": self.protocol, "model": self.model, "dim": self.dim,
                     "prompts": self.prompts}
        self.fingerprint = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def encode(self, texts: Sequence[str], batch_size: int, kind: str = "passage"):
        """L2-normalised float32 vectors from the service, in requests bounded by count and tokens; raises
        RemoteUnavailable (a SemanticUnavailable) when the service cannot answer."""
        import numpy as np

        texts = with_prompt(texts, self.prompts, kind)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for batch in token_bounded_batches(texts, self.settings.semantic_remote_batch_max,
                                           self.settings.semantic_remote_batch_tokens):
            out.append(self._request(texts[batch.start : batch.stop]))
        vectors = np.concatenate(out)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)

    def tokens(self, text: str, kind: str) -> int:
        return estimated_tokens(with_prompt([text], self.prompts, kind)[0])

    def _request(self, texts: list[str]):
        """One batch, with the breaker's leave and the bounded retries."""
        self.breaker.allow()
        attempts = self.settings.semantic_remote_retries + 1
        for attempt in range(attempts):
            try:
                try:
                    vectors = self._post(texts)
                except _Failure:
                    raise
                except Exception as exc:  # noqa: BLE001 -- anything else still ends the probe and counts
                    raise _Failure(type(exc).__name__, retry=False) from None
            except _Failure as failure:
                _count_request("retry" if failure.retry and attempt + 1 < attempts else "failure")
                if failure.retry and attempt + 1 < attempts and self.breaker.state == CLOSED:
                    time.sleep(random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)))
                    continue
                self.breaker.failure(failure.reason)
                raise RemoteUnavailable(f"the embedding service at {self.url} failed: {failure.reason}",
                                        retry_load_after=self.breaker.cooldown) from None
            _count_request("success")
            self.breaker.success()
            return vectors
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, texts: list[str]):
        import numpy as np
        import urllib3

        if self.protocol == "tei":
            body = {"inputs": texts, "normalize": True, "truncate": True}
        else:
            body = {"model": self.model, "input": texts, "encoding_format": "float"}
        try:
            response = self._http.request("POST", self._endpoint, body=json.dumps(body).encode(),
                                          headers=self._headers)
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out, DNS: worth another try
            raise _Failure(_network_reason(exc), retry=True) from None
        if response.status != 200:
            raise _Failure(f"HTTP {response.status}", retry=response.status in RETRY_STATUSES)
        try:
            data = json.loads(response.data)
            rows = data if self.protocol == "tei" else [row["embedding"] for row in
                                                        sorted(data["data"], key=lambda row: row["index"])]
            vectors = np.asarray(rows, dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise _Failure(f"an answer that is not {self.protocol} embeddings ({type(exc).__name__})",
                           retry=False) from None
        if vectors.ndim != 2 or len(vectors) != len(texts) or (self.dim and vectors.shape[1] != self.dim):
            raise _Failure(f"{vectors.shape[0] if vectors.ndim else 0} vectors of shape {vectors.shape[1:]} for "
                           f"{len(texts)} texts of dimension {self.dim or 'any'}", retry=False)
        return vectors

    def describe(self) -> dict:
        """What /status and /readyz show: never the token, never credentials in the URL."""
        described = {"backend": self.backend, "url": self.url, "protocol": self.protocol, "model": self.model,
                     "dim": self.dim, "fingerprint": self.fingerprint[:12], "breaker": self.breaker.state,
                     "consecutive_failures": self.breaker.failures}
        if self.breaker.state != CLOSED:
            described["last_error"] = self.breaker.last_error
        if self.prompts:
            described["prompts"] = self.prompts
        return described


def _network_reason(exc: Exception) -> str:
    """A short reason for a network failure, without urllib3's object reprs."""
    import urllib3

    cause = getattr(exc, "reason", None) or exc
    # NewConnectionError is a ConnectTimeoutError to urllib3 2: refusals are told apart first.
    if "refused" in str(cause).lower():
        return "connection refused"
    timeouts = (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ConnectTimeoutError)
    if isinstance(exc, timeouts) or isinstance(cause, timeouts):
        return "timed out"
    return type(cause).__name__


def _set_breaker_gauge(state: str) -> None:
    try:
        from monitoring import metrics

        metrics.remote_breaker.set(BREAKER_STATES.index(state))
    except Exception:  # noqa: BLE001 -- a metric must never fail a request
        log.debug("the breaker gauge could not be set", exc_info=True)


def _count_request(outcome: str) -> None:
    try:
        from monitoring import metrics

        metrics.remote_requests.labels(outcome=outcome).inc()
    except Exception:  # noqa: BLE001 -- a metric must never fail a request
        log.debug("the remote request counter could not be incremented", exc_info=True)
