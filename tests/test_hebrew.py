"""app/hebrew.py: normalisation and prefix-aware word matching."""

import pytest

from app import hebrew


def test_niqqud_and_cantillation_are_removed():
    assert hebrew.normalize("בְּרֵאשִׁ֖ית בָּרָ֣א") == "בראשית ברא"


def test_maqaf_splits_and_abbreviation_quotes_vanish():
    assert hebrew.raw_terms('בית־ספר צה"ל צה״ל') == ["בית", "ספר", "צהל", "צהל"]


@pytest.mark.parametrize("word, stem", [("והספרים", "ספרים"), ("בבית", "בית"), ("לספר", "ספר"),
                                        ("שהמורים", "מורים"), ("וכשהלכנו", "הלכנו")])
def test_prefix_forms_include_the_stem(word, stem):
    assert stem in hebrew.prefix_stems(word)


def test_stems_keep_at_least_two_letters():
    assert hebrew.prefix_stems("ולב") == ["לב"]
    assert hebrew.prefix_stems("בו") == []


def test_like_wildcards_are_escaped():
    assert hebrew.escape_like("100%_a\\b") == "100\\%\\_a\\\\b"


def test_invisible_and_control_characters_are_dropped():
    assert hebrew.raw_terms("\u202eשלום\u200f\x00עולם") == ["שלום", "עולם"]


def test_index_terms_fold_final_letters_and_split_on_underscore():
    assert hebrew.terms("מלך_שלום a_b") == ["מלכ", "שלומ", "a", "b"]


@pytest.mark.parametrize("word, expected", [("מלך", ["לך"]), ("והספרים", ["הספרים", "ספרים"]),
                                            ("בן", []), ("ספר", []), ("book", [])])
def test_prefix_stems_keep_two_letters_and_never_start_with_a_final_letter(word, expected):
    assert hebrew.prefix_stems(word) == expected


@pytest.mark.parametrize("word, expected", [("שולחנ", "שלחנ"), ("שלחנ", None), ("ספרימ", None),
                                            ("תלמידימ", "תלמדימ"), ("ילד", None), ("מחברות", None), ("ממוחשבות", "ממחשבות")])
def test_skeleton_drops_inner_vowel_letters_but_not_plural_endings(word, expected):
    assert hebrew.skeleton(word) == expected


# --- the dictionary analysis (Hspell's lexicon) ---

@pytest.fixture
def lexicon_present():
    import shutil

    from app import lexicon
    from support import require

    require(shutil.which("hspell") is not None, "Hspell is not installed (apt-get install hspell)")
    assert hebrew.lexicon() is not None


@pytest.mark.parametrize("form, lemma", [("עכברים", "עכבר"), ("שולחנות", "שולחן"), ("בתי", "בית"),
                                         ("ילדיה", "ילד"), ("ספריו", "ספר"), ("העכברים", "עכבר")])
def test_plural_construct_and_possessive_forms_have_their_lemma(lexicon_present, form, lemma):
    assert lemma in hebrew.analyse(form).lemmas
    assert hebrew.fold_finals(lemma) in hebrew.alternate_terms(form)


def test_a_stacked_prefix_the_lexicon_rejects_is_not_stripped(lexicon_present):
    # ב + בלמים "in brakes"; the rules also read ב + ב + ל + מים, "water".
    assert hebrew.analyse("בבלמים").stems == ("בלמים",)
    assert "מימ" not in hebrew.alternate_terms("בבלמים") and "למימ" not in hebrew.alternate_terms("בבלמים")


def test_a_word_by_itself_keeps_its_own_lemmas_only(lexicon_present):
    king = hebrew.analyse("מלך")
    assert king.whole and king.stems == ("לך",) and "הלך" not in king.lemmas


# Slang and loanwords Hspell does not list: בבלאגן keeps ב + בלאגן, not also ב+ב+ל + אגן, "basin".
@pytest.mark.parametrize("word, stems", [("אייפון", ()), ("ואייפון", ("אייפון",)), ("בבלאגן", ("בלאגן",)),
                                         ("והוואטסאפ", ("הוואטסאפ", "וואטסאפ"))])
def test_unknown_words_keep_the_rules_with_real_prefix_strings(lexicon_present, word, stems):
    analysis = hebrew.analyse(word)
    assert not analysis.known and analysis.lemmas == () and analysis.stems == stems
    assert set(stems) <= set(hebrew.prefix_stems(word))  # the rules' stems, those after a real prefix string


def test_without_a_lexicon_the_rules_of_old(monkeypatch):
    from app import lexicon

    hebrew.reset()
    monkeypatch.setattr(lexicon, "get", lambda *a, **k: None)
    try:
        assert hebrew.analyzer_version().endswith("+rules")
        assert hebrew.analyse("בבלמים").stems == tuple(hebrew.prefix_stems("בבלמים"))
        assert hebrew.analyse("עכברים").lemmas == ()
    finally:
        monkeypatch.undo()
        hebrew.reset()


def test_a_headword_meets_its_forms_not_its_homographs(lexicon_present):
    # מחברת, a notebook, is also "connects" (of חיבר): an item about an author (מחבר) is no answer.
    assert hebrew.analyse("מחברת").lemmas == () and "חיבר" not in hebrew.alternate_terms("מחברת")


def test_lemmas_give_no_spelling_skeletons(lexicon_present):
    # מחשבים's lemma חישב spelled without its vowel letter is חשב, an accountant.
    assert "חישב" in hebrew.alternate_terms("מחשבים") and "חשב" not in hebrew.alternate_terms("מחשבים")


@pytest.mark.parametrize("word, stem", [("והוורד", "ורד"), ("והורד", "ורד"), ("הוועד", "ועד")])
def test_a_waw_after_a_prefix_is_read_doubled_as_the_academy_writes_it_or_single_as_people_do(
        lexicon_present, word, stem):
    assert stem in hebrew.analyse(word).stems
