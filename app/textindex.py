"""The Hebrew text index: an inverted index on both back ends, BM25-style ranking, and a
bounded cost for any query.

Each item row carries ``index_text``: the analysed forms of its title and body as a JSON array
``[title, body, title_alt, body_alt, version]`` of space-separated terms (app/hebrew.py makes them;
app/db.py fills the column before every insert and update; ``version`` is hebrew.analyzer_version(),
so that rows analysed another way are found and analysed again: see rebuild()). The database keeps the index in step
inside the same transaction as the write:

- SQLite: an FTS5 table with external content (a view that unpacks ``index_text``), maintained by
  triggers on ``items``; ranked by FTS5's ``bm25()`` with per-column weights.
- PostgreSQL: a stored generated ``tsvector`` column (``simple`` configuration; weights A title,
  B body, C title alternates, D body alternates) under a GIN index; ranked by ``ts_rank``. A second,
  small one holds the title alone (A, C) under its own GIN index (migration 0003), for the tiers below.

Ranking over every match grows with the table: at 100k generated items a typical query matches
~14,000 of them, and scoring each cost ~6 µs on PostgreSQL (half reading the row and its TOASTed
tsvector, half ts_rank) and ~3 µs in FTS5's bm25(). So a query matching more than CANDIDATES items
ranks a bounded candidate set instead: a few tiers read from the indexes (every word in the title,
every word with one in the title, two words with one in the title, every word, any word in a title,
any match), at most CANDIDATES items each in the index's own order, scored by the same formula as
before. The narrow tiers hold the items that rank first, so thousands of items holding one frequent
word cannot push them out (the old best match of the issue stays first); the cost no longer depends
on the table. bench/textscale.py measures how often the top 10 agrees with the exhaustive ranking.

Exact forms outrank alternates twice over: a document's prefix-stripped forms, lemmas (from Hspell's
lexicon: a plural's singular) and defective-spelling forms sit in the low-weight ``*_alt`` columns, and
a query's own stripped forms and lemmas count ALT_FACTOR of an exact query word, except the lemmas of
a word no title or body holds as written, which stand in for it (LEMMA_FACTOR). Only the first
MAX_TERMS distinct query words are searched, and very frequent words are
left out when rarer ones are present, so a query costs what its posting lists cost.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from sqlalchemy import event, text

from . import hebrew

# Distinct query words searched; the rest of a long query is ignored (bounded cost).
MAX_TERMS = 16
# A query word's own stripped forms and spelling skeletons weigh this much of the word itself.
ALT_FACTOR = 0.3
# The lemmas (Hspell's: a plural's singular, a construct's base) of a query word that no title or body
# holds as written weigh this much of a word: the word is read as its lemmas, as a prefixed word is read
# as its stem (PREFIXED_RATIO). On the tuning half of bench/relevance/meaning, text nDCG@10 on inflected
# queries went from 0.874 to 0.922 (SQLite) and 0.818 to 0.898 (PostgreSQL) against ALT_FACTOR, and the
# generated set did not lose (0.900 to 0.901, 0.871 to 0.872).
LEMMA_FACTOR = 1.0
# A word found in more than this share of items (and more than FREQUENT_MIN_DOCS items) is "frequent":
# when the query has rarer words, it is not searched (its posting list would cost the most, say least).
FREQUENT_FRACTION = 0.05
FREQUENT_MIN_DOCS = 1000
# A query word whose stripped stem is this many times more common is read as prefixes + that stem.
PREFIXED_RATIO = 4
# ts_rank normalisation: 0 (none) scored nDCG@10 0.871 on bench/relevance, 1 (log length) 0.841,
# 2 (length) 0.613; bodies are capped at 5,000 characters, so length cannot run away.
PG_NORMALIZATION = 0
# PostgreSQL: items holding a stem (in any column) looked at to see whether it is a word of its own.
PLAUSIBLE_SAMPLE = 500
# Bounded ranking: items ranked per query are at most CANDIDATES from each tier (see _tiers), so a
# query of frequent words costs the same at 1M items as at 10k. Measured on 100k generated items
# (bench/textscale.py): the exhaustive PostgreSQL ranking spent 3 µs a match reading the row and its
# TOASTed tsvector and 3 µs in ts_rank, over ~14,000 matches for a typical query (p50 44 ms); FTS5's
# bm25() cost the same per match. A query matching fewer items than CANDIDATES is ranked exhaustively.
CANDIDATES = 200
# Column weights: title over body, exact forms over alternates. One ratio on both back ends.
TITLE_WEIGHT, BODY_WEIGHT, TITLE_ALT_WEIGHT, BODY_ALT_WEIGHT = 4.0, 1.0, 2.0, 0.5
COLUMNS = ("title", "body", "title_alt", "body_alt")

FTS = "items_fts"
FTS_SOURCE = "items_fts_src"
FTS_VOCAB = "items_fts_vocab"
TSV = "index_tsv"
# PostgreSQL: the title's exact forms (A) and alternates (C) alone, so that a title tier is read from
# its own GIN index (GIN cannot select index_tsv's entries by weight without visiting every row).
TITLE_TSV = "index_title_tsv"
# BM25 constants of FTS5's bm25() (sqlite/ext/fts5/fts5_aux.c), replicated by _bm25().
BM25_K1, BM25_B = 1.2, 0.75


# --- analysis -----------------------------------------------------------------------------------

def _alternates(raw_words: list[str]) -> str:
    return " ".join(alt for word in raw_words for alt in hebrew.alternate_terms(word))


def document(title: str, body: str) -> str:
    """The ``index_text`` value of an item: its analysed fields, as stored in the row."""
    title_words, body_words = hebrew.raw_terms(title or ""), hebrew.raw_terms(body or "")
    fields = [" ".join(map(hebrew.fold_finals, title_words)), " ".join(map(hebrew.fold_finals, body_words)),
              _alternates(title_words), _alternates(body_words), hebrew.analyzer_version()]
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


@dataclass
class Plan:
    """What a query searches: its words (capped), their accepted alternates, and what was left out."""

    words: list[str]
    alternates: list[str] = field(default_factory=list)  # stripped forms and spelling skeletons
    dropped_frequent: list[str] = field(default_factory=list)
    ignored: int = 0  # distinct words past MAX_TERMS
    lemmas: list[str] = field(default_factory=list)  # of words no title or body holds as written
    rarity: dict[str, float] = field(default_factory=dict)  # each query word (as typed) -> IDF of it as read

    def every(self) -> list[str]:
        """Every term the query searches."""
        return self.words + self.alternates + self.lemmas

    def groups(self) -> list[tuple[list[str], float]]:
        """The query's terms in groups scored apart, each with its share of an exact word's weight."""
        found = [(self.words, 1.0), (self.alternates, ALT_FACTOR), (self.lemmas, LEMMA_FACTOR)]
        return [(terms, factor) for terms, factor in found if terms]


@dataclass
class Result:
    hits: list[tuple[int, float]]
    plan: Plan


def query_words(query: str) -> tuple[list[str], int]:
    """The first MAX_TERMS distinct raw words of a query, and how many more were ignored."""
    distinct = list(dict.fromkeys(hebrew.raw_terms(query)))
    return distinct[:MAX_TERMS], max(0, len(distinct) - MAX_TERMS)


# --- DDL ----------------------------------------------------------------------------------------

def _dialect(conn) -> str:
    bind = conn.get_bind() if hasattr(conn, "get_bind") else conn
    return bind.dialect.name


def _sqlite_ddl() -> list[str]:
    unpack = ", ".join(f"json_extract(index_text, '$[{i}]') AS {name}" for i, name in enumerate(COLUMNS))
    cols = ", ".join(COLUMNS)

    def values(row: str) -> str:
        return ", ".join(f"json_extract({row}.index_text, '$[{i}]')" for i in range(len(COLUMNS)))

    return [
        # The view is the FTS5 table's external content: 'rebuild' and 'delete' read columns from it.
        f"CREATE VIEW IF NOT EXISTS {FTS_SOURCE} AS SELECT id, {unpack} FROM items WHERE index_text IS NOT NULL",
        # tokenize=ascii: the columns hold analysed terms separated by spaces; nothing else to split.
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS} USING fts5({cols}, content='{FTS_SOURCE}', "
        "content_rowid='id', tokenize='ascii')",
        f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_VOCAB} USING fts5vocab({FTS}, 'col')",
        # A row without index_text (an old row not analysed yet) is not in the index: see rebuild().
        f"CREATE TRIGGER IF NOT EXISTS {FTS}_ai AFTER INSERT ON items WHEN new.index_text IS NOT NULL BEGIN "
        f"INSERT INTO {FTS}(rowid, {cols}) VALUES (new.id, {values('new')}); END",
        f"CREATE TRIGGER IF NOT EXISTS {FTS}_ad AFTER DELETE ON items WHEN old.index_text IS NOT NULL BEGIN "
        f"INSERT INTO {FTS}({FTS}, rowid, {cols}) VALUES ('delete', old.id, {values('old')}); END",
        f"CREATE TRIGGER IF NOT EXISTS {FTS}_au AFTER UPDATE OF id, index_text ON items BEGIN "
        f"INSERT INTO {FTS}({FTS}, rowid, {cols}) SELECT 'delete', old.id, {values('old')} "
        "WHERE old.index_text IS NOT NULL; "
        f"INSERT INTO {FTS}(rowid, {cols}) SELECT new.id, {values('new')} WHERE new.index_text IS NOT NULL; END",
    ]


def _weighted(columns: str, weights: str) -> str:
    return " || ".join(f"setweight(to_tsvector('simple', coalesce(index_text::json->>{i}, '')), '{w}')"
                       for i, w in zip(columns, weights))


def _postgresql_ddl() -> list[str]:
    return [
        "ALTER TABLE items ADD COLUMN IF NOT EXISTS index_text text",
        # A stored generated column is recomputed by PostgreSQL in the writing statement itself.
        f"ALTER TABLE items ADD COLUMN IF NOT EXISTS {TSV} tsvector "
        f"GENERATED ALWAYS AS ({_weighted((0, 1, 2, 3), 'ABCD')}) STORED",
        f"CREATE INDEX IF NOT EXISTS ix_items_{TSV} ON items USING gin ({TSV})",
        f"ALTER TABLE items ADD COLUMN IF NOT EXISTS {TITLE_TSV} tsvector "
        f"GENERATED ALWAYS AS ({_weighted((0, 2), 'AC')}) STORED",
        f"CREATE INDEX IF NOT EXISTS ix_items_{TITLE_TSV} ON items USING gin ({TITLE_TSV})",
    ]


# PostgreSQL objects this module makes on items, which the models do not describe (app/release.py).
PG_COLUMNS = (TSV, TITLE_TSV)
PG_INDEXES = tuple(f"ix_items_{column}" for column in PG_COLUMNS)


def ensure_schema(conn) -> bool:
    """Create the index where it is missing (idempotent); True when the SQLite index was made new."""
    if _dialect(conn) == "sqlite":
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(items)"))}
        if "index_text" not in columns:
            conn.execute(text("ALTER TABLE items ADD COLUMN index_text TEXT"))
        existed = conn.execute(text("SELECT 1 FROM sqlite_master WHERE name = :n"), {"n": FTS}).first()
        for statement in _sqlite_ddl():
            conn.execute(text(statement))
        if not existed:  # rows analysed before the index existed (dropped, or copied in) get indexed
            conn.execute(text(f"INSERT INTO {FTS}({FTS}) VALUES ('rebuild')"))
        return not existed
    present = set(conn.execute(text(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'items'")).scalars())
    indexed = set(conn.execute(text("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
                                    "AND tablename = 'items'")).scalars())
    if {"index_text", *PG_COLUMNS} <= present and set(PG_INDEXES) <= indexed:
        return False  # ALTER TABLE would take an exclusive lock on items even when it changes nothing
    for statement in _postgresql_ddl():
        conn.execute(text(statement))
    return False


def drop(conn) -> None:
    """Remove the SQLite index objects (PostgreSQL's live in the items table and go with it)."""
    if _dialect(conn) == "sqlite":
        for name in (FTS_VOCAB, FTS):
            conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
        conn.execute(text(f"DROP VIEW IF EXISTS {FTS_SOURCE}"))


def attach(items_table) -> None:
    """Make create_all/drop_all build and remove the index together with the items table."""
    event.listen(items_table, "after_create", lambda _t, conn, **_kw: ensure_schema(conn))
    event.listen(items_table, "before_drop", lambda _t, conn, **_kw: drop(conn))


# --- query --------------------------------------------------------------------------------------

def _fts_phrase(term: str) -> str:
    return f'"{term}"'  # terms are letters and digits only; quoting keeps FTS5 keywords literal


def _pg_query(terms: list[str], weights: str = "", op: str = "|") -> str:
    return f" {op} ".join(f"'{t}'{':' + weights if weights else ''}" for t in terms)


def _document_frequencies(conn, dialect: str, terms: list[str], cap: int) -> dict[str, int]:
    """How many titles and bodies hold each term as a word of their own (alternates not counted).

    SQLite reads the counts from the FTS5 vocabulary table (one b-tree lookup a term); PostgreSQL
    estimates frequent terms from its statistics and counts the others up to ``cap``.
    """
    if not terms:
        return {}
    if dialect == "sqlite":
        rows = conn.execute(text(
            f"SELECT term, sum(doc) FROM {FTS_VOCAB} WHERE term IN (SELECT value FROM json_each(:terms)) "
            "AND col IN ('title', 'body') GROUP BY term"), {"terms": json.dumps(terms, ensure_ascii=False)})
        found = {t: min(int(n), cap) for t, n in rows}
    else:
        # Frequent terms are read from the planner's statistics (ANALYZE's most common elements of the
        # tsvector column): counting their matches would visit thousands of rows. The others are rare
        # enough to count, up to ``cap``; before the first ANALYZE every term is counted that way.
        # Whether a term is a word of some title or body (weights A, B) is asked of the first
        # PLAUSIBLE_SAMPLE items holding it at all: GIN cannot select by weight, and a stem found
        # in the alternates of thousands of items would otherwise cost a visit to each of them.
        # Titles are asked first: their small tsvector is read without TOAST, and most words are in one.
        rows = _through_index(conn, f"""
            WITH common AS (
                SELECT e.elem, e.freq FROM pg_stats s,
                       unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs) AS e(elem, freq)
                WHERE s.schemaname = current_schema() AND s.tablename = 'items' AND s.attname = '{TSV}')
            SELECT t, CASE
                WHEN NOT EXISTS (SELECT 1 FROM (SELECT {TITLE_TSV} AS v FROM items WHERE {TITLE_TSV} @@ any_q
                                                LIMIT {PLAUSIBLE_SAMPLE}) s WHERE v @@ title_q)
                 AND NOT EXISTS (SELECT 1 FROM (SELECT {TSV} AS v FROM items WHERE {TSV} @@ any_q
                                                LIMIT {PLAUSIBLE_SAMPLE}) s WHERE v @@ q) THEN 0
                WHEN c.freq IS NOT NULL THEN ceil(c.freq * (
                     SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = 'items'::regclass))
                ELSE (SELECT count(*) FROM (SELECT 1 FROM items WHERE {TSV} @@ q LIMIT :cap) s) END
            FROM unnest(CAST(:terms AS text[])) AS t
            CROSS JOIN LATERAL to_tsquery('simple', quote_literal(t) || :exact_only) AS q
            CROSS JOIN LATERAL to_tsquery('simple', quote_literal(t)) AS any_q
            CROSS JOIN LATERAL to_tsquery('simple', quote_literal(t) || :title_only) AS title_q
            LEFT JOIN common c ON c.elem = t""",
            {"terms": terms, "cap": cap, "exact_only": ":AB", "title_only": ":A"})
        found = {t: min(int(n), cap) for t, n in rows}
    return {t: found.get(t, 0) for t in terms}


def plan(conn, query: str) -> Plan:
    """Decide what a query searches (at most MAX_TERMS words, plausible alternates, frequent words).

    The prefix-stripped forms of a query word are those app/hebrew.py's analysis accepts (for a word
    the lexicon knows, its own splits), and each is kept only when it is itself an indexed word; when
    it is also far more common than the word as written (ובתוף / תוף), the written word is read as
    prefixes + that stem: the stem is searched as the word and the written form as an alternate.
    Otherwise (מלך / לך, both common words) the written word stays the word.
    The word's lemmas are alternates too, so that a plural finds its singular and back.
    """
    dialect = _dialect(conn)
    raw, ignored = query_words(query)
    if not raw:
        return Plan([], ignored=ignored)
    size = conn.execute(text("SELECT coalesce(max(id), 0) FROM items")).scalar_one()
    threshold = max(FREQUENT_MIN_DOCS, int(size * FREQUENT_FRACTION))
    analysed = {w: hebrew.analyse(w) for w in raw}
    stems = {w: [hebrew.fold_finals(s) for s in a.stems] for w, a in analysed.items()}
    every = list(dict.fromkeys([hebrew.fold_finals(w) for w in raw] + [s for ss in stems.values() for s in ss]))
    df = _document_frequencies(conn, dialect, every, threshold + 1)
    words, alternates, lemmas, rarity = [], [], [], {}
    for written in raw:
        word = hebrew.fold_finals(written)
        accepted = [s for s in stems[written] if df[s] > 0]
        best = max(accepted, key=lambda s: df[s], default=None)
        if best is not None and df[best] >= PREFIXED_RATIO * max(df[word], 1):
            word, accepted = best, [word] + [s for s in accepted if s != best]
        words.append(word)
        alternates.extend(accepted)
        # Lemmas are searched whether or not some title or body holds them as written (the forms that
        # share them hold them among their alternates: עכברים, עכבר), and without spelling skeletons. A
        # word no title or body holds as written (מזוודות) is searched through its lemmas (מזוודה) at
        # LEMMA_FACTOR; the lemmas of a word that is written somewhere are alternates like its stems.
        own = [hebrew.fold_finals(lemma) for lemma in analysed[written].lemmas]
        (lemmas if df[word] == 0 else alternates).extend(own)
        rarity[written] = _idf(size, df[word])  # as read: השטיח as common as שטיח when read as ה + שטיח
    words = list(dict.fromkeys(words))
    dropped: list[str] = []
    frequent = [w for w in words if df[w] > threshold]
    if 0 < len(frequent) < len(words):
        dropped = frequent
        words = [w for w in words if w not in frequent]
    skeletons = [k for w in words + alternates if (k := hebrew.skeleton(w))]
    lemmas = [l for l in dict.fromkeys(lemmas) if l not in words and l not in dropped]
    alternates = [a for a in dict.fromkeys(alternates + skeletons)
                  if a not in words and a not in dropped and a not in lemmas]
    return Plan(words, alternates, dropped, ignored, lemmas, rarity)


def _idf(rows: int, holding: int) -> float:
    """BM25's inverse document frequency of a term ``holding`` of ``rows`` items hold (as FTS5 floors it)."""
    holding = min(holding, rows)  # a count of titles and bodies may pass the items'
    value = math.log((rows - holding + 0.5) / (holding + 0.5))
    return value if value > 0 else 1e-6


def coverage(conn, found: Result) -> float:
    """How much of the query its best match holds, 0..1: the query's words weighted by their rarity
    (``Plan.rarity``), a word held when the item holds it or one of its alternates (a stem, a lemma, a
    respelling) in its title or body. A match on every word is 1; a match on the common words of a
    query phrased unlike the items (its rare words in no item at all) is near 0."""
    rarity = found.plan.rarity
    if not found.hits or not rarity:
        return 0.0
    stored = conn.execute(text("SELECT index_text FROM items WHERE id = :id"), {"id": found.hits[0][0]}).scalar()
    if not stored:  # deleted since, or not analysed yet
        return 0.0
    held = set(" ".join(json.loads(stored)[:len(COLUMNS)]).split())
    covered = sum(weight for word, weight in rarity.items()
                  if held.intersection([hebrew.fold_finals(word), *hebrew.alternate_terms(word)]))
    return covered / sum(rarity.values())


def search(conn, query: str, limit: int) -> Result:
    """Item ids ranked by relevance over every match (ties: newer id first), at most ``limit``."""
    chosen = plan(conn, query)
    if not chosen.words or limit <= 0:
        return Result([], chosen)
    if _dialect(conn) == "sqlite":
        rows = _search_sqlite(conn, chosen, limit)
    else:
        rows = _search_postgresql(conn, chosen, limit)
    return Result([(int(i), float(s)) for i, s in rows], chosen)


# Most words a query may have for the "two of its words" tier (its clause lists every pair of them).
PAIR_TIER_WORDS = 5


def _tiers(chosen: Plan) -> list[list[tuple[str, str, list[str]]]]:
    """The candidate tiers of a query: each a list of clauses (where, how, terms), all to hold.

    ``where`` is "titles" (the title's forms and their alternates) or "all"; ``how`` is "AND", "OR" or "PAIRS" (two of the terms). Each tier is read from the index
    in the index's own order (SQLite: ascending rowid; PostgreSQL: its bitmap's physical order), at
    most CANDIDATES items each, so the candidate set is bounded whatever the words. The narrow tiers
    hold the kinds of items that rank first (every word in the title; every word with one in the
    title; two of three words with one in the title), each a tier of its own, so thousands of items
    holding one frequent word do not push them out: the best match stays first. The
    broad tiers come last; a query matching fewer than CANDIDATES items gets every match from the
    last one and is ranked exhaustively.
    """
    words, every = chosen.words, chosen.every()
    tiers = [[("titles", "AND", words)]]
    if len(words) > 1:
        tiers.append([("titles", "OR", words), ("all", "AND", words)])
    if 3 <= len(words) <= PAIR_TIER_WORDS:
        tiers.append([("titles", "OR", words), ("all", "PAIRS", words)])
    tiers += [[("all", "AND", words)], [("titles", "OR", every)], [("all", "OR", every)]]
    return tiers


def _fts_clause(where: str, how: str, terms: list[str]) -> str:
    if how == "PAIRS":
        joined = " OR ".join(f"({_fts_phrase(a)} AND {_fts_phrase(b)})"
                             for i, a in enumerate(terms) for b in terms[i + 1:])
    else:
        joined = f" {how} ".join(map(_fts_phrase, terms))
    columns = "{title title_alt} : " if where == "titles" else ""
    return f"{columns}({joined})"


def _averages(conn) -> tuple[int, int]:
    """FTS5's row count and total token count (every column), as bm25() reads them.

    They live in the index's "averages" record (rowid 1 of the %_data table: a varint row count,
    then one varint token total per column; sqlite/ext/fts5/fts5_index.c), read here in O(1).
    """
    blob = conn.execute(text(f"SELECT block FROM {FTS}_data WHERE id = 1")).scalar()
    values, value, i = [], 0, 0
    while blob and i < len(blob):
        for k in range(9):  # SQLite varint: 7 bits a byte, high bit set on all but the last; 9th byte whole
            byte = blob[i]
            i += 1
            if k == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        values.append(value)
        value = 0
    return (values[0], sum(values[1:])) if values else (0, 0)


def _bm25(rows, groups: list[list[str]], hits: dict[str, int], rows_total: int, tokens_total: int,
          ) -> dict[int, list[float]]:
    """FTS5's bm25() (negated: higher is better) of the given rows, one score per group of phrases.

    Computed as if the rows were the results of one MATCH per group: a term's frequency is the sum
    of its column weights over its occurrences, a row's length counts every column's tokens, and a
    term's IDF counts every row of the index holding it (``hits``), so a score does not depend on
    which rows are ranked. tests/test_textindex.py checks it against bm25() itself.
    """
    weights = (TITLE_WEIGHT, BODY_WEIGHT, TITLE_ALT_WEIGHT, BODY_ALT_WEIGHT)
    avgdl = tokens_total / rows_total if rows_total else 1.0
    idf, group_of = {}, {}
    for g, phrases in enumerate(groups):
        for phrase in phrases:
            idf[phrase], group_of[phrase] = _idf(rows_total, hits[phrase]), g
    # Whole terms: the columns hold analysed terms joined by single spaces.
    finder = re.compile(r"(?<!\S)(?:" + "|".join(map(re.escape, idf)) + r")(?!\S)").findall
    scores = {}
    for item_id, *columns in rows:
        length, frequency = 0, {}
        for weight, column in zip(weights, columns):
            if column:
                length += column.count(" ") + 1
                for term in finder(column):
                    frequency[term] = frequency.get(term, 0.0) + weight
        norm = BM25_K1 * (1 - BM25_B + BM25_B * length / avgdl)
        row = scores[item_id] = [0.0] * len(groups)
        for term, f in frequency.items():
            row[group_of[term]] += idf[term] * f * (BM25_K1 + 1) / (f + norm)
    return scores


def _search_sqlite(conn, chosen: Plan, limit: int):
    every = chosen.every()
    matched = conn.execute(text(f"SELECT count(*) FROM (SELECT 1 FROM {FTS} WHERE {FTS} MATCH :q LIMIT :n)"),
                           {"q": " OR ".join(map(_fts_phrase, every)), "n": CANDIDATES + 1}).scalar_one()
    if matched <= CANDIDATES:
        return _rank_sqlite_matches(conn, chosen, limit)
    tiers = _tiers(chosen)
    params = {f"t{i}": " AND ".join(_fts_clause(*clause) for clause in tier) for i, tier in enumerate(tiers)}
    params["n"] = CANDIDATES
    union = " UNION ".join(f"SELECT id FROM (SELECT rowid AS id FROM {FTS} WHERE {FTS} MATCH :t{i} LIMIT :n)"
                           for i in range(len(tiers)))
    # The candidates are ranked here, in Python, by the bm25() formula: FTS5 ranks only a whole
    # MATCH, and restricting one to a list of rowids re-reads every posting list for each rowid
    # (measured: 670 ms for 500 candidates at 100k items).
    rows = conn.execute(text(f"SELECT id, {', '.join(COLUMNS)} FROM {FTS_SOURCE} WHERE id IN ({union})"),
                        params).all()
    counted = conn.execute(text("SELECT " + ", ".join(
        f"(SELECT count(*) FROM {FTS} WHERE {FTS} MATCH :p{i})" for i in range(len(every)))),
        {f"p{i}": _fts_phrase(p) for i, p in enumerate(every)}).one()
    rows_total, tokens_total = _averages(conn)
    groups = chosen.groups()
    scores = _bm25(rows, [terms for terms, _ in groups], dict(zip(every, counted)), rows_total, tokens_total)
    scored = [(i, sum(factor * score for (_, factor), score in zip(groups, row))) for i, row in scores.items()]
    return sorted(scored, key=lambda pair: (-pair[1], -pair[0]))[:limit]


def _rank_sqlite_matches(conn, chosen: Plan, limit: int):
    """Every match ranked by FTS5's own bm25(): a query matching at most CANDIDATES items."""
    weights = f"{TITLE_WEIGHT}, {BODY_WEIGHT}, {TITLE_ALT_WEIGHT}, {BODY_ALT_WEIGHT}"
    # bm25() is negative, lower is better: negated here so that every score reads "higher is better".
    parts, params = [], {"limit": limit}
    for g, (terms, factor) in enumerate(chosen.groups()):
        parts.append(f"SELECT rowid AS id, -{factor} * bm25({FTS}, {weights}) AS s FROM {FTS} WHERE {FTS} MATCH :g{g}")
        params[f"g{g}"] = " OR ".join(map(_fts_phrase, terms))
    # LIMIT -1 keeps SQLite from flattening the subquery, which would take bm25() out of its context.
    statement = (f"SELECT id, sum(s) AS score FROM ({' UNION ALL '.join(parts)} LIMIT -1) "
                 "GROUP BY id ORDER BY score DESC, id DESC LIMIT :limit")
    return conn.execute(text(statement), params).all()


def _pg_clause(name: str, where: str, how: str, terms: list[str]) -> tuple[str, dict]:
    """One clause of a tier (see _tiers) as a WHERE condition, and its tsquery parameter."""
    if how == "PAIRS":
        query = " | ".join(f"('{a}' & '{b}')" for i, a in enumerate(terms) for b in terms[i + 1:])
    else:
        # No clause asks for weights: GIN would then recheck every row it returns, reading index_tsv
        # from TOAST (a "title and body" tier measured 25 ms at 100k items for that reason).
        query = _pg_query(terms, "", "&" if how == "AND" else "|")
    column = TITLE_TSV if where == "titles" else TSV
    return f"{column} @@ to_tsquery('simple', :{name})", {name: query}


def _search_postgresql(conn, chosen: Plan, limit: int):
    # ts_rank weights are listed {D, C, B, A}: body_alt, title_alt, body, title.
    weights = f"'{{{BODY_ALT_WEIGHT / TITLE_WEIGHT}, {TITLE_ALT_WEIGHT / TITLE_WEIGHT}, " \
              f"{BODY_WEIGHT / TITLE_WEIGHT}, 1.0}}'::float4[]"
    params = {"limit": limit, "n": CANDIDATES}
    scores, sources = [], []
    for g, (terms, factor) in enumerate(chosen.groups()):
        scores.append(f"{factor} * ts_rank({weights}, {TSV}, q{g}, {PG_NORMALIZATION})")
        sources.append(f"to_tsquery('simple', :g{g}) AS q{g}")
        params[f"g{g}"] = _pg_query(terms)
    score, sources = " + ".join(scores), ", ".join(sources)
    # Each tier is one constant tsquery (an expression over the q's would hide it from the GIN index).
    conditions = []
    for i, tier in enumerate(_tiers(chosen)):
        clauses = []
        for j, clause in enumerate(tier):
            condition, clause_params = _pg_clause(f"t{i}_{j}", *clause)
            clauses.append(condition)
            params.update(clause_params)
        conditions.append(" AND ".join(clauses))
    union = " UNION ".join(f"(SELECT id FROM items WHERE {c} LIMIT :n)" for c in conditions)
    statement = (f"WITH candidates AS MATERIALIZED ({union}) "
                 f"SELECT id, {score} AS score FROM items, {sources} "
                 "WHERE id IN (SELECT id FROM candidates) ORDER BY score DESC, id DESC LIMIT :limit")
    return _through_index(conn, statement, params)


def _through_index(conn, statement: str, params: dict) -> list:
    """Run a PostgreSQL statement with sequential scans disabled for it alone.

    Past ~20 % of the table the planner prefers a sequential scan that evaluates @@ on every row
    (measured at 100k items: 140 ms against 8 ms through the GIN bitmap); for a rare term it scans
    the whole table where the index answers at once. The previous setting comes back straight after,
    inside the same transaction.
    """
    previous = conn.execute(text("SELECT current_setting('enable_seqscan')")).scalar_one()
    conn.execute(text("SELECT set_config('enable_seqscan', 'off', true)"))
    try:
        return conn.execute(text(statement), params).all()
    finally:
        conn.execute(text("SELECT set_config('enable_seqscan', :v, true)"), {"v": previous})


# --- existing databases -------------------------------------------------------------------------

def _stale(dialect: str) -> str:
    """SQL condition of a row whose analysis is missing or another analyzer's (the JSON's last element)."""
    if dialect == "sqlite":
        return "(index_text IS NULL OR json_extract(index_text, '$[4]') IS NOT :version)"
    return "(index_text IS NULL OR (index_text::json->>4) IS DISTINCT FROM :version)"


def count_stale(conn) -> int:
    """How many items the current analyzer has not analysed (the release's work, before it starts)."""
    return conn.execute(text(f"SELECT count(*) FROM items WHERE {_stale(_dialect(conn))}"),
                        {"version": hebrew.analyzer_version()}).scalar_one()


def rebuild(engine, batch_size: int = 1000, start_id: int = 0, echo=None, progress=None,
            check_all: bool = False) -> dict:
    """Build or refresh the index of an existing database; idempotent and resumable.

    Rows whose ``index_text`` is missing or from another analyzer version (``check_all``: every row,
    compared with a fresh analysis) are re-analysed in batches of ``batch_size`` ids, each batch its own
    transaction, so an interrupted run keeps what it did and the next run (or ``start_id``) goes on from
    there; a run over a current index changes nothing. ``progress(n)`` hears of each batch's rows.
    """
    with engine.begin() as conn:
        ensure_schema(conn)
    version = hebrew.analyzer_version()
    condition = "" if check_all else f"AND {_stale(engine.dialect.name)} "
    done = {"checked": 0, "updated": 0, "last_id": start_id}
    while True:
        with engine.begin() as conn:
            rows = conn.execute(text(f"SELECT id, title, body, index_text FROM items WHERE id > :after {condition}"
                                     "ORDER BY id LIMIT :n"),
                                {"after": done["last_id"], "n": batch_size, "version": version}).all()
            if not rows:
                return done
            changed = []
            for item_id, title, body, stored in rows:
                fresh = document(title, body)
                if stored != fresh:
                    changed.append({"id": item_id, "doc": fresh})
            if changed:
                conn.execute(text("UPDATE items SET index_text = :doc WHERE id = :id"), changed)
        done["checked"] += len(rows)
        done["updated"] += len(changed)
        done["last_id"] = rows[-1][0]
        if progress:
            progress(len(rows))
        if echo:
            echo(f"checked {done['checked']} items up to id {done['last_id']}, updated {done['updated']}")
