"""app/textindex.py: the Hebrew text index on SQLite (FTS5) and PostgreSQL (tsvector + GIN)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from app import textindex
from app.db import Item, db


def add(app, *items) -> list[int]:
    """Insert (title, body) pairs in order (so later ones have larger ids); return their ids."""
    with app.app_context():
        rows = [Item(title=title, body=body) for title, body in items]
        db.session.add_all(rows)
        db.session.commit()
        return [row.id for row in rows]


def ids(app, query: str, limit: int = 10) -> list[int]:
    with app.app_context():
        return [item_id for item_id, _ in textindex.search(db.session, query, limit).hits]


def plan(app, query: str) -> textindex.Plan:
    with app.app_context():
        return textindex.plan(db.session, query)


def test_a_prefixed_word_finds_its_stem_and_back(app):
    prefixed, bare = add(app, ("והספרים החדשים", ""), ("ספרים ישנים", ""))
    assert set(ids(app, "ספרים")) == {prefixed, bare}
    assert set(ids(app, "והספרים")) == {prefixed, bare}


def test_exact_form_ranks_above_a_stripped_one(app):
    exact, stripped = add(app, ("ספרים", "על המדף"), ("בספרים", "על המדף"))
    assert ids(app, "ספרים") == [exact, stripped]
    assert ids(app, "בספרים") == [stripped, exact]


def test_niqqud_and_cantillation_are_ignored_both_ways(app):
    pointed, plain = add(app, ("בְּרֵאשִׁ֖ית בָּרָ֣א", ""), ("בראשית", ""))
    assert set(ids(app, "בראשית")) == {pointed, plain}
    assert set(ids(app, "בְּרֵאשִׁית")) == {pointed, plain}


def test_final_letters_and_maqaf(app):
    king, school = add(app, ("מלך", ""), ("בית־ספר", ""))
    assert ids(app, "מלכ") == [king]  # typed without the final letter
    assert ids(app, "ספר") == [school]  # maqaf separates words


def test_full_and_defective_spellings_find_each_other(app):
    full, defective = add(app, ("שולחן עבודה", ""), ("שלחן ערוך", ""))
    assert set(ids(app, "שלחן")) == {full, defective}
    assert set(ids(app, "שולחן")) == {full, defective}


def test_melekh_is_not_read_as_prefix_plus_final_letter():
    from app import hebrew

    assert "ך" not in hebrew.prefix_stems("מלך") and "כ" not in hebrew.prefix_stems("מלך")


def test_king_ranks_above_an_item_holding_only_lekh(app):
    king, go = add(app, ("מלך ישראל", ""), ("לך לשלום", ""))
    assert ids(app, "מלך")[0] == king


def test_a_stripped_query_word_counts_only_when_it_is_an_indexed_word(app):
    add(app, ("בגדים חדשים", ""))
    assert "גד" not in plan(app, "בגד").alternates  # ב + גד: גד is no word of this index
    add(app, ("גד ואשר", ""))
    assert "גד" in plan(app, "בגד").alternates


def test_a_rare_prefixed_form_of_a_common_stem_is_read_as_prefixes(app):
    add(app, *[(f"כינור {n}", "") for n in range(10)])  # BM25 gives a word in most items no weight
    drums = add(app, *[("תוף מרים", "")] * textindex.PREFIXED_RATIO)
    (prefixed,) = add(app, ("שיר", "ערב של שירה ונגינה ובתוף"))
    chosen = plan(app, "ובתוף")
    assert chosen.words == ["תופ"] and "ובתופ" in chosen.alternates
    assert ids(app, "ובתוף")[0] in drums  # the word in a title beats its rare form in a body
    assert prefixed in ids(app, "ובתוף")


def test_old_item_with_every_word_in_its_title_comes_first_past_any_cap(app):
    # The old engine kept the 500 newest LIKE matches: the old, best item fell out of its results.
    (old,) = add(app, ("עוגת שוקולד ביתית", "מתכון"))
    add(app, *[(f"פריט {n}", "שוקולד מריר מהמדף") for n in range(600)])
    assert ids(app, "עוגת שוקולד ביתית", limit=5)[0] == old


def test_frequent_words_past_the_candidate_bound_still_give_the_best_match(app, monkeypatch):
    # Ranking is bounded: CANDIDATES items per tier, each tier read in index order (oldest first).
    # The best items are the newest here, behind more than CANDIDATES older items of each weaker
    # kind, so a single "any match" tier would never reach them.
    monkeypatch.setattr(textindex, "CANDIDATES", 5)
    add(app, *[(f"פריט {n}", "שוקולד מריר עם עוגה") for n in range(12)],  # both words, in bodies only
        *[(f"שוקולד {n}", "מהמדף") for n in range(12)],  # one word, in the title
        *[(f"עוגה {n}", "אפויה") for n in range(12)])
    title_and_body, both_in_title = add(app, ("עוגה ביתית", "עם שוקולד"), ("עוגה עם שוקולד", "מתכון"))
    found = ids(app, "עוגה שוקולד", limit=3)
    assert found[:2] == [both_in_title, title_and_body], found


def test_candidates_are_scored_like_fts5_bm25(app):
    # SQLite ranks a bounded candidate set in Python (textindex._bm25); it must give bm25()'s scores.
    add(app, ("עוגת שוקולד", "מתכון קצר"), ("שוקולד מריר", "שוקולד שוקולד ועוגה " + "מילה " * 40),
        ("ועוגה", "בלי כלום"), ("לחם", "שוקולד"), ("עוגה", ""), ("סתם", "טקסט אחר"))
    with app.app_context():
        conn = db.session.connection()
        if conn.dialect.name != "sqlite":
            pytest.skip("PostgreSQL ranks its candidates with ts_rank in SQL")
        chosen = textindex.plan(conn, "עוגה שוקולד")
        assert chosen.alternates  # ועוגה's stem: both groups of phrases are scored
        expected = dict(textindex._rank_sqlite_matches(conn, chosen, 100))
        every = chosen.words + chosen.alternates
        rows = conn.execute(text(f"SELECT id, {', '.join(textindex.COLUMNS)} FROM {textindex.FTS_SOURCE}")).all()
        hits = {p: conn.execute(text(f"SELECT count(*) FROM {textindex.FTS} WHERE {textindex.FTS} MATCH :p"),
                                {"p": f'"{p}"'}).scalar_one() for p in every}
        scores = textindex._bm25(rows, [chosen.words, chosen.alternates], hits, *textindex._averages(conn))
    computed = {i: e + textindex.ALT_FACTOR * a for i, (e, a) in scores.items() if e or a}
    assert computed.keys() == expected.keys()
    for item_id, score in expected.items():
        assert computed[item_id] == pytest.approx(score, rel=1e-9), item_id


def test_index_follows_insert_update_and_delete(app):
    (item_id,) = add(app, ("תפוזים", "מיץ טבעי"))
    assert ids(app, "תפוזים") == [item_id]
    with app.app_context():
        db.session.get(Item, item_id).title = "אשכוליות"
        db.session.commit()
    assert ids(app, "תפוזים") == []
    assert ids(app, "אשכוליות") == [item_id]
    with app.app_context():
        db.session.delete(db.session.get(Item, item_id))
        db.session.commit()
    assert ids(app, "אשכוליות") == []
    assert ids(app, "מיץ") == []


def test_index_matches_the_rows_after_writes(app):
    """The index holds exactly the rows' analysed text (FTS5 integrity-check / tsvector recomputed)."""
    first, second = add(app, ("אחד", "שתיים"), ("שלוש", "ארבע"))
    with app.app_context():
        db.session.get(Item, first).body = "חמש"
        db.session.delete(db.session.get(Item, second))
        db.session.commit()
        if db.engine.dialect.name == "sqlite":
            db.session.execute(text("INSERT INTO items_fts(items_fts, rank) VALUES ('integrity-check', 1)"))
            assert db.session.execute(text("SELECT count(*) FROM items_fts")).scalar_one() == 1
        else:
            stale = db.session.execute(text(
                "SELECT count(*) FROM items WHERE index_text IS DISTINCT FROM :doc"),
                {"doc": textindex.document("אחד", "חמש")}).scalar_one()
            assert stale == 0
    assert ids(app, "חמש") == [first]  # the changed body was analysed again


def test_a_failed_write_leaves_the_index_unchanged(app):
    (item_id,) = add(app, ("עגבניות", ""))
    with app.app_context():
        db.session.get(Item, item_id).title = "מלפפונים"
        db.session.flush()  # the index is written in this transaction...
        db.session.rollback()  # ...and rolled back with it
    assert ids(app, "עגבניות") == [item_id]
    assert ids(app, "מלפפונים") == []


def test_long_query_searches_at_most_max_terms_words(app):
    words = [f"{a}{b}" for a in "אבגדהזחטכלמנסעפצקרשת" for b in "אבגדהזחטכלמנסעפצקרשת"][:170]
    query = " ".join(words)[:500]
    searched = len(set(query.split()))
    assert searched > textindex.MAX_TERMS
    first, beyond = add(app, ("x", f"{words[0]} " + "מילה " * 900), ("y", f"{words[40]} " + "מילה " * 900))
    chosen = plan(app, query)
    assert len(chosen.words) == textindex.MAX_TERMS
    assert chosen.ignored == searched - textindex.MAX_TERMS
    assert ids(app, query) == [first]  # a word past the cap is not searched at all


def test_frequent_words_are_left_out_when_rarer_ones_are_present(app, monkeypatch):
    monkeypatch.setattr(textindex, "FREQUENT_MIN_DOCS", 3)
    monkeypatch.setattr(textindex, "FREQUENT_FRACTION", 0.0)
    rare, *_ = add(app, ("שקד נדיר", ""), *[("שקד", "")] * 5)
    chosen = plan(app, "שקד נדיר")
    assert chosen.words == ["נדיר"] and chosen.dropped_frequent == ["שקד"]
    assert ids(app, "שקד נדיר") == [rare]
    assert len(ids(app, "שקד")) == 6  # alone, a frequent word is still searched


def test_limit_is_respected_and_ties_go_to_the_newer_item(app):
    created = add(app, *[("זהה", "")] * 5)
    assert ids(app, "זהה", limit=3) == sorted(created, reverse=True)[:3]


@pytest.mark.parametrize("query", ["", "   ", "!!! ??? %%%", "_"])
def test_a_query_without_words_finds_nothing(app, query):
    add(app, ("משהו", ""))
    assert ids(app, query) == []


def _forget_index(app) -> None:
    """Make the database look like one created before the text index existed."""
    with app.app_context(), db.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            textindex.drop(conn)
            for suffix in ("ai", "ad", "au"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS items_fts_{suffix}"))
            conn.execute(text("ALTER TABLE items DROP COLUMN index_text"))
        else:
            conn.execute(text("ALTER TABLE items DROP COLUMN index_text CASCADE"))


def _insert_raw(app, titles) -> None:
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text("INSERT INTO items (title, body, search_text, created_at, updated_at) "
                          "VALUES (:t, '', :t, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), [{"t": t} for t in titles])


def test_rebuild_indexes_an_existing_database_and_is_idempotent(app):
    _forget_index(app)
    _insert_raw(app, ["ענבים", "תאנים", "רימונים"])
    with app.app_context():
        first = textindex.rebuild(db.engine, batch_size=2)
        second = textindex.rebuild(db.engine, batch_size=2)
    assert (first["checked"], first["updated"]) == (3, 3)
    assert (second["checked"], second["updated"]) == (0, 0)  # every row carries the current analyzer's version
    with app.app_context():
        assert textindex.rebuild(db.engine, check_all=True)["checked"] == 3
    assert len(ids(app, "תאנים")) == 1


def test_rebuild_resumes_after_an_interruption(app):
    _forget_index(app)
    _insert_raw(app, ["אגס", "שזיף", "משמש", "אפרסק"])

    def stop(_message):
        raise KeyboardInterrupt

    with app.app_context():
        with pytest.raises(KeyboardInterrupt):
            textindex.rebuild(db.engine, batch_size=2, echo=stop)
        assert len(ids(app, "אגס")) == 1  # the first batch was committed
        resumed = textindex.rebuild(db.engine, batch_size=2)
    assert resumed["updated"] == 2
    assert len(ids(app, "אפרסק")) == 1


def test_search_leaves_the_planner_settings_as_it_found_them(app):
    add(app, ("תפוחים", ""))
    with app.app_context():
        if db.engine.dialect.name != "postgresql":
            pytest.skip("the planner setting exists on PostgreSQL only")
        textindex.search(db.session, "תפוחים", 5)
        assert db.session.execute(text("SELECT current_setting('enable_seqscan')")).scalar_one() == "on"


# --- the dictionary analysis (Hspell's lexicon, app/lexicon.py) ---

@pytest.fixture
def lexicon_present():
    import shutil

    from app import hebrew
    from support import require

    require(shutil.which("hspell") is not None, "Hspell is not installed (apt-get install hspell)")
    assert hebrew.lexicon() is not None


@pytest.mark.parametrize("stored, typed", [
    ("עכבר אלחוטי", "עכברים"), ("עכברים אלחוטיים", "עכבר"),  # plural <-> singular
    ("שולחן עץ", "שולחנות"), ("בתי קפה בעיר", "בית"),  # construct plural <-> singular
    ("הילדים שלה", "ילדיה"), ("ספריו האחרונים", "ספר"),  # possessive <-> plain
])
def test_inflected_forms_find_each_other(app, lexicon_present, stored, typed):
    wanted, _other = add(app, (stored, ""), ("משהו אחר לגמרי", ""))
    assert ids(app, typed) == [wanted]


def test_a_stacked_prefix_the_lexicon_rejects_does_not_make_a_rare_word_common(app, lexicon_present):
    # בבלמים is ב + בלמים ("in brakes"); read as ב+ב+ל + מים, water items would come first.
    water = add(app, *[(f"בקבוק מים {n}", "") for n in range(6)])
    (brakes,) = add(app, ("תקלה בבלמים של הרכב", ""))
    chosen = plan(app, "בבלמים")
    assert "מימ" not in chosen.words + chosen.alternates
    found = ids(app, "בבלמים")
    assert found == [brakes] and not set(found) & set(water)


def test_a_word_no_item_holds_as_written_is_searched_as_its_lemma(app, lexicon_present):
    # מזוודות is in no title or body: its lemma מזוודה stands in for it at a word's weight, so the item about
    # a suitcase outranks those holding שלא, a commoner word of the query, as written (at ALT_FACTOR the
    # lemma would not).
    add(app, *[(f"פריט {n}", "") for n in range(50)], *[(f"מכשיר {n} שלא עובד", "") for n in range(8)])
    common = add(app, ("חבילה שלא נמסרה", ""), ("משכיר שלא מתקן", ""))
    (suitcase,) = add(app, ("המזוודה לא הגיעה ליעד", "טופס בדלפק"))
    chosen = plan(app, "מזוודות שלא הגיעו")
    assert "מזוודה" in chosen.lemmas and "מזוודה" not in chosen.alternates
    found = ids(app, "מזוודות שלא הגיעו", limit=100)
    assert suitcase in found and set(common) <= set(found)
    with app.app_context():
        if db.session.connection().dialect.name == "sqlite":  # ts_rank weighs no word's rarity
            assert found[0] == suitcase, found


def coverage(app, query: str) -> float:
    with app.app_context():
        return textindex.coverage(db.session, textindex.search(db.session, query, 10))


def test_coverage_is_the_share_of_the_query_the_best_match_holds(app, lexicon_present):
    add(app, *[(f"שטיח {n}", "שטיח גדול") for n in range(6)], ("עכבר אלחוטי", "סוללה חדשה"))
    assert coverage(app, "עכברים אלחוטיים") == 1.0  # every word, through its lemma
    assert 0.3 < coverage(app, "עכבר ורוד") < 0.7  # one of two rare words
    assert coverage(app, "החתלתול עושה פיפי על השטיח") < 0.01  # only its common word, read as ה + שטיח
    assert coverage(app, "מילים שאינן") == 0.0


def test_an_unknown_word_keeps_its_prefix_stems(app, lexicon_present):
    (phone,) = add(app, ("אייפון חדש", ""))
    assert ids(app, "ואייפון") == [phone]  # ו + a word Hspell does not list, stripped by rule


def test_both_back_ends_index_the_same_terms(tmp_path, lexicon_present):
    from app import create_app
    from app.db import create_schema
    from support import make_settings, postgres_url, require

    require(postgres_url() is not None, "TEST_DATABASE_URL is not set (a PostgreSQL server for tests)")
    items = [("העכברים האלחוטיים", "בבלמים של הרכב ובבלאגן"), ("שולחנות", "ילדיה ובתי הספר")]
    terms, stored = {}, {}
    for name, url in (("sqlite", None), ("postgresql", postgres_url())):
        app = create_app(make_settings(tmp_path / name, **({"DATABASE_URL": url} if url else {})))
        with app.app_context():
            db.drop_all()
            db.session.execute(text("DROP TABLE IF EXISTS alembic_version"))
            db.session.commit()
            create_schema()
        add(app, *items)
        with app.app_context():
            stored[name] = db.session.execute(text("SELECT index_text FROM items ORDER BY id")).scalars().all()
            if name == "sqlite":
                query = f"SELECT DISTINCT term FROM {textindex.FTS_VOCAB}"
            else:
                query = f"SELECT word FROM ts_stat('SELECT {textindex.TSV} FROM items')"
            terms[name] = set(db.session.execute(text(query)).scalars())
            db.session.remove()  # ends the read's transaction: the next test's drop_all would wait on it
            db.engine.dispose()
    assert stored["sqlite"] == stored["postgresql"]
    assert terms["sqlite"] == terms["postgresql"] and {"עכבר", "בלמ", "שולחנ", "ילד"} <= terms["sqlite"]
