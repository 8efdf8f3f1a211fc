"""The version 2 model artifact (issue 11 items 1 and 6): weights in memory-mapped external-data files
shared by every process that loads them, the optimized variant checked by its probe with a fallback
to the portable model, old artifacts still served, and batches bounded by padded tokens."""

import json
import shutil

import numpy as np
import pytest

from app.semantic import encoders
from bench.sharing import measure, single_file_copy
from support import make_settings

TEXTS = ["שלום עולם", "ספרים טובים לילדים בקיץ", "טיול בגליל העליון עם נחלים " * 12, "x"]
LONG = ["טיול ארוך בגליל העליון עם נחלים מפלים ויערות " * 30 + str(i) for i in range(10)]


def load(model_dir, tmp_path, **env):
    return encoders.load_encoder(make_settings(tmp_path, SEMANTIC_MODEL=str(model_dir), **env))


@pytest.fixture
def artifact_copy(tiny_onnx, tmp_path):
    """A private copy of the tiny artifact that a test may damage."""
    return shutil.copytree(tiny_onnx, tmp_path / "artifact")


def test_artifact_keeps_weights_outside_the_graphs(tiny_onnx):
    import onnx

    manifest = json.loads((tiny_onnx / encoders.ARTIFACT_MANIFEST).read_text())
    assert manifest["version"] == 2 and manifest["optimized_probe_diff"] <= encoders.PROBE_MAX_DIFF
    for graph, data in ((encoders.PORTABLE_MODEL, encoders.PORTABLE_DATA),
                        (encoders.OPTIMIZED_MODEL, encoders.OPTIMIZED_DATA)):
        model = onnx.load(str(tiny_onnx / graph), load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, f"{graph} holds its weights inside"
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {data}
    probe = json.loads((tiny_onnx / encoders.PROBE_FILE).read_text())
    assert len(probe["sentences"]) == len(probe["embeddings"]) >= 3


def test_new_artifact_embeds_exactly_like_todays_single_file_model(tiny_onnx, tmp_path):
    old = load(single_file_copy(tiny_onnx, tmp_path / "v1"), tmp_path)
    new = load(tiny_onnx, tmp_path)
    assert old.describe()["variant"] == "single-file" and new.describe()["variant"] == "optimized"
    diff = np.abs(old.encode(TEXTS, 2) - new.encode(TEXTS, 2)).max()
    assert diff <= 1e-5, f"the v2 artifact's embeddings differ from the single-file model's by {diff}"


def test_version_1_artifact_is_still_served_with_a_warning(tiny_onnx, tmp_path, caplog):
    encoder = load(single_file_copy(tiny_onnx, tmp_path / "v1"), tmp_path)
    assert encoder.describe()["artifact_version"] == 1
    assert "re-prepare it" in caplog.text and "--force" in caplog.text


def test_unknown_artifact_version_is_refused_with_how_to_re_prepare(artifact_copy, tmp_path):
    path = artifact_copy / encoders.ARTIFACT_MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": 3}))
    with pytest.raises(encoders.ModelError, match="version 3.*re-prepare"):
        load(artifact_copy, tmp_path)


def test_optimized_variant_failing_its_probe_falls_back_to_the_portable_model(artifact_copy, tiny_onnx, tmp_path):
    path = artifact_copy / encoders.PROBE_FILE
    probe = json.loads(path.read_text())
    probe["embeddings"][0][0] += 0.1  # what a weight packed for another CPU would look like
    path.write_text(json.dumps(probe))
    encoder = load(artifact_copy, tmp_path)
    described = encoder.describe()
    assert described["variant"] == "portable" and "probe embeddings differ" in described["fallback_reason"]
    reference = load(tiny_onnx, tmp_path).encode(TEXTS, 2)
    # Unpacked kernels round differently from prepacked ones, well within the probe's tolerance.
    assert np.abs(encoder.encode(TEXTS, 2) - reference).max() <= encoders.PROBE_MAX_DIFF


def test_unloadable_optimized_variant_falls_back_and_readyz_says_why(make_app, artifact_copy):
    (artifact_copy / encoders.OPTIMIZED_MODEL).write_bytes(b"not an onnx graph")
    client = make_app(SEMANTIC_MODEL=str(artifact_copy)).test_client()
    client.post("/items", json={"title": "ספר"})
    assert client.get("/search", query_string={"q": "ספר", "mode": "semantic"}).status_code == 200
    semantic = client.get("/readyz").get_json()["semantic"]
    assert semantic["variant"] == "portable" and encoders.OPTIMIZED_MODEL in semantic["fallback_reason"]


@pytest.mark.parametrize("lengths, size, cap, expected", [
    ([10, 10, 10], 2, 1000, [[0, 1], [2]]),        # count alone
    ([100, 100, 100, 100], 10, 250, [[0, 1], [2, 3]]),  # padded tokens alone
    ([5, 5, 200, 5], 10, 300, [[0, 1], [2], [3]]),  # one long text pads the whole batch: split around it
    ([600, 10], 10, 512, [[0], [1]]),              # longer than the cap alone: a batch of one
    ([], 4, 100, []),
])
def test_token_batches_bound_count_and_padded_tokens(lengths, size, cap, expected):
    assert [list(r) for r in encoders.token_batches(lengths, size, cap)] == expected


class Recording:
    """Wraps an ONNX Runtime session and records the input shape of every run."""

    def __init__(self, session):
        self.session, self.shapes = session, []

    def run(self, outputs, feed):
        self.shapes.append(feed["input_ids"].shape)
        return self.session.run(outputs, feed)

    def get_inputs(self):
        return self.session.get_inputs()


def test_a_batch_of_long_texts_reaches_the_runtime_in_token_bounded_parts(tiny_onnx, tmp_path):
    encoder = load(tiny_onnx, tmp_path)
    encoder.session = recorder = Recording(encoder.session)
    vectors = encoder.encode(LONG, len(LONG))
    assert len(recorder.shapes) > 1, "ten texts of the full length went to the runtime as one batch"
    assert all(rows * tokens <= encoders.MAX_BATCH_TOKENS for rows, tokens in recorder.shapes), recorder.shapes
    assert sum(rows for rows, _ in recorder.shapes) == len(LONG) and vectors.shape == (len(LONG), encoder.dim)
    recorder.shapes.clear()
    encoder.encode(TEXTS[:2], len(LONG))
    assert len(recorder.shapes) == 1  # short texts still travel together


def test_the_torch_encoder_bounds_its_batches_by_tokens_too(tiny_model, tmp_path):
    encoder = load(tiny_model, tmp_path)
    shapes, forward = [], encoder.model.forward
    encoder.model.forward = lambda **enc: shapes.append(tuple(enc["input_ids"].shape)) or forward(**enc)
    encoder.encode(LONG, len(LONG))
    assert len(shapes) > 1 and all(rows * tokens <= encoders.MAX_BATCH_TOKENS for rows, tokens in shapes), shapes


@pytest.fixture(scope="module")
def wide_artifact(tmp_path_factory):
    """A model whose matmul weights (~70 MB of fp32, all read by every encoding, unlike the embedding
    table of which only the rows of the tokens seen are paged in) outweigh a process's own memory,
    so that a private copy of them per process could not hide in the measurement."""
    from app.semantic import synthetic
    from app.semantic.prepare import prepare

    root = tmp_path_factory.mktemp("wide")
    synthetic.ARCHES["wide-test"] = dict(vocab_size=2000, hidden_size=512, num_hidden_layers=2,
                                         num_attention_heads=8, intermediate_size=8192, max_position_embeddings=512)
    try:
        source = synthetic.build(root / "source", arch="wide-test")
    finally:
        del synthetic.ARCHES["wide-test"]
    return prepare(str(source), root / "artifact", precision="fp32") and root / "artifact"


def test_processes_loading_the_artifact_share_its_weights(wide_artifact, tmp_path):
    one = measure(wide_artifact, 1, tmp_path / "one")
    two = measure(wide_artifact, 2, tmp_path / "two")
    assert one["model"]["variant"] == "optimized"
    # Private weights would make two processes cost twice one; shared, the second adds only its own part.
    assert two["pss_mb"] < 1.6 * one["pss_mb"], (one, two)
