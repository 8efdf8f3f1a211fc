"""bench/relevance/evaluate.py: every free-text search mode scored through the API's entry point,
semantic with a real model's prompts, and the comparison without them."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.relevance import evaluate

# Items 1..40 of the labelled corpus and two queries over them: enough to run every step, fast.
CORPUS = json.loads(evaluate.CORPUS.read_text(encoding="utf-8"))[:40]
QUERIES = [{"q": "שוקולד", "category": "prefix", "relevant": {"1": 2, "5": 1}},
           {"q": "עוגת שוקולד", "category": "multi-word", "relevant": {"1": 1}}]


def test_metrics_on_a_hand_computed_case():
    relevant = {1: 2, 2: 1}
    assert evaluate.ndcg_at_k([1, 2, 3], relevant) == pytest.approx(1.0)
    # Best item second: (1/log2(2)·(2^1-1) + 1/log2(3)·(2^2-1)) / (3 + 1/log2(3)).
    assert evaluate.ndcg_at_k([2, 1], relevant) == pytest.approx((1 + 3 / 1.5849625) / (3 + 1 / 1.5849625))
    assert evaluate.recall_at_k([3, 1], relevant) == 0.5


def test_every_free_text_mode_is_scored_and_a_new_one_joins_by_itself(monkeypatch):
    import app.search

    assert evaluate.scored_modes(semantic=True) == ["text", "semantic"] + (
        ["hybrid"] if "hybrid" in app.search.MODES else [])
    monkeypatch.setattr(app.search, "MODES", (*app.search.MODES, "fused-later"))
    assert "fused-later" in evaluate.scored_modes(semantic=True)
    assert evaluate.scored_modes(semantic=False) == ["text", "fused-later"]


def test_results_of_a_mode_that_fell_back_are_refused():
    assert evaluate.ranked_ids([{"id": 3}, {"id": 1}]) == [3, 1]
    assert evaluate.ranked_ids({"results": [{"id": 2}], "fallback": None}) == [2]
    with pytest.raises(RuntimeError, match="fell back.*semantic search is disabled"):
        evaluate.ranked_ids({"results": [{"id": 2}], "fallback": {"mode": "text",
                                                                    "reason": "semantic search is disabled"}})


@pytest.fixture
def prompted_artifact(tiny_onnx, tmp_path):
    """The tiny artifact, with prompts its Hebrew-only tokenizer can tell apart."""
    artifact = shutil.copytree(tiny_onnx, tmp_path / "prompted")
    manifest = artifact / "memfit_model.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()),
                                    "prompts": {"query": "שאלה: ", "passage": "קטע: "}}))
    return artifact


def test_the_corpus_is_scored_in_every_mode_through_search_run(prompted_artifact, tmp_path, monkeypatch):
    import app.search

    queried = []
    run = app.search.run
    monkeypatch.setattr(app.search, "run", lambda mode, q, limit: queried.append(mode) or run(mode, q, limit))
    app_ = evaluate.load_app(None, tmp_path, prompted_artifact, CORPUS)
    evaluate.embed_everything(app_)
    scores = evaluate.score_modes(app_, ["text", "semantic"], QUERIES)
    assert sorted(set(queried)) == ["semantic", "text"] and len(queried) == 2 * len(QUERIES)
    assert scores["text"]["ndcg@10"] > 0 and scores["text"]["by_category"]["prefix"]["queries"] == 1
    assert 0 <= scores["semantic"]["ndcg@10"] <= 1
    assert evaluate.describe_model(app_)["prompts"] == {"query": "שאלה: ", "passage": "קטע: "}


def test_the_comparison_serves_the_same_model_without_its_prompts(prompted_artifact, tmp_path):
    from app.semantic.encoders import load_encoder
    from support import make_settings

    bare = evaluate.without_prompts(prompted_artifact, tmp_path / "bare")
    with_prompts = load_encoder(make_settings(tmp_path, SEMANTIC_MODEL=str(prompted_artifact)))
    without = load_encoder(make_settings(tmp_path, SEMANTIC_MODEL=str(bare)))
    assert with_prompts.prompts and without.prompts == {}
    assert without.fingerprint != with_prompts.fingerprint  # never mixed with the prompted vectors
    assert (without.encode(["קטע: שלום"], 1) == with_prompts.encode(["שלום"], 1)).all()
    assert json.loads((prompted_artifact / "memfit_model.json").read_text())["prompts"], "the original was changed"
