"""The previous team's set-up, kept as the benchmark's baseline: sentence-transformers imported at
module top (so every worker pays for torch, sklearn and scipy before any request) and the fp32
model served by torch. Everything else is memfit's app, so the difference is exactly those choices.

    gunicorn -c gunicorn.conf.py bench.naive_app:app
"""

from sentence_transformers import SentenceTransformer  # noqa: F401 - the module-top import being measured

from app import create_app

app = create_app()
