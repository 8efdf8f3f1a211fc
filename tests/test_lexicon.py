"""app/lexicon.py: Hspell's lexicon as one memory-mapped file, built from the installed Hspell."""

import shutil

import pytest

from app import lexicon
from support import require


@pytest.fixture(scope="module")
def lex():
    require(shutil.which("hspell") is not None and (lexicon.SOURCE / "hebrew.wgz").exists(),
            "Hspell is not installed (apt-get install hspell)")
    found = lexicon.get()
    assert found is not None, "the lexicon was neither found nor built"
    return found


@pytest.mark.parametrize("form, lemma", [("עכברים", "עכבר"), ("שולחנות", "שולחן"), ("בתי", "בית"),
                                         ("ילדיה", "ילד"), ("עוגת", "עוגה")])
def test_inflected_forms_have_their_lemma(lex, form, lemma):
    assert lemma in lex.lemmas(lex.find(form))


def test_a_word_hspell_does_not_list_is_not_found(lex):
    assert lex.find("אייפון") == -1 and lex.find("book") == -1


def test_prefix_rules_come_from_hspell(lex):
    assert lex.accepts("ב", lex.find("בלמים")) and lex.accepts("וה", lex.find("ספרים"))
    assert "בב" not in lex.prefixes and "ככה" not in lex.prefixes
    assert not lex.accepts("ה", lex.find("ילדיה"))  # no article before a possessive form


def test_names_are_their_own_lemma_not_hspells_miscellaneous_one(lex):
    assert lexicon.MISC_LEMMA not in lex.lemmas(lex.find("דוד")) + lex.lemmas(lex.find("בית"))


def test_lemmas_reached_only_as_a_verb_with_an_object_pronoun_are_left_out(lex):
    assert lex.lemmas(lex.find("ספרים")) == ["ספר"]  # not also סיפר, "tell them!"


def test_a_build_is_atomic_and_readable(lex, tmp_path):
    out = tmp_path / "lex.bin"
    made = lexicon.build(output=out)
    assert made["words"] == len(lex) and list(tmp_path.iterdir()) == [out]
    copy = lexicon.Lexicon(out)
    try:
        assert copy.id == lex.id and copy.lemmas(copy.find("עכברים")) == ["עכבר"]
    finally:
        copy.close()


def test_without_a_file_or_hspell_there_is_no_lexicon(tmp_path, caplog):
    assert lexicon.get(tmp_path / "none.bin", source=tmp_path) is None
    assert "no Hebrew lexicon" in caplog.text
    lexicon.forget()
