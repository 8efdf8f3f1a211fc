"""The one exception every semantic back end raises when it cannot answer now (a model that failed to
load, an embedding service that is down, a queue past its deadline): callers answer 503 with its
message, and hybrid search falls back to text. Its own module so that the back ends (encoders.py,
remote.py) and the service that drives them can all raise it without importing each other."""


class SemanticUnavailable(RuntimeError):
    """Semantic search cannot answer now; the message says why (shown to the client with a 503)."""
