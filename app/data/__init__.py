"""The bundled Hebrew sample (``sample_items.json``): seeded by the CLI, the training text of synthetic models."""

from __future__ import annotations

import json
from importlib import resources

SAMPLE = "sample_items.json"


def load_sample() -> list[dict]:
    """The bundled Hebrew dataset: a JSON list of {title, body, tags}."""
    return json.loads(resources.files(__name__).joinpath(SAMPLE).read_text(encoding="utf-8"))
