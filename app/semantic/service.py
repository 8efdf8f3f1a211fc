"""The semantic-search service: the model is loaded on the first semantic request, once.

Nothing here imports numpy, onnxruntime, torch or transformers at module level: a worker that only
serves text and tag search never pays for them (torch alone is ~220 MB of RSS on import).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..settings import Settings

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .encoders import Encoder

log = logging.getLogger(__name__)

DISABLED, NOT_LOADED, LOADING, LOADED, FAILED = "disabled", "not_loaded", "loading", "loaded", "failed"
# A failed load is retried at most this often, so a bad model name does not cost a load per request.
RETRY_AFTER_SECONDS = 300.0


class SemanticUnavailable(RuntimeError):
    """Semantic search cannot answer now; the message says why (shown to the client with a 503)."""


class SemanticService:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._encoder: Encoder | None = None
        self._state = NOT_LOADED if settings.enable_semantic_search else DISABLED
        self._error: str | None = None
        self._failed_at = 0.0
        self.load_seconds: float | None = None
        self.load_count = 0

    @property
    def state(self) -> str:
        return self._state

    @property
    def error(self) -> str | None:
        return self._error

    def status(self) -> dict:
        status = {"state": self._state, "model": self.settings.semantic_model}
        if self._error:
            status["error"] = self._error
        if self._encoder is not None:
            status.update(self._encoder.describe(), load_seconds=round(self.load_seconds or 0.0, 3))
        return status

    def encoder(self) -> "Encoder":
        """The loaded encoder, loading it on first call; raises SemanticUnavailable with a reason."""
        encoder = self._encoder
        if encoder is not None:  # fast path without the lock once loaded
            return encoder
        if self._state == DISABLED:
            raise SemanticUnavailable("semantic search is disabled (ENABLE_SEMANTIC_SEARCH=false)")
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            if self._state == FAILED and time.monotonic() - self._failed_at < RETRY_AFTER_SECONDS:
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}")
            self._state = LOADING
            started = time.perf_counter()
            try:
                from .encoders import load_encoder  # heavy imports happen only here

                self._encoder = load_encoder(self.settings)
            except Exception as exc:  # any load failure degrades semantic search, never the app
                self._state, self._failed_at = FAILED, time.monotonic()
                self._error = _describe(exc)
                log.error("semantic model %r failed to load: %s", self.settings.semantic_model, self._error)
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}") from None
            self.load_seconds = time.perf_counter() - started
            self.load_count += 1
            self._state, self._error = LOADED, None
            log.info("semantic model loaded in %.2fs: %s", self.load_seconds, self._encoder.describe())
            return self._encoder


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
