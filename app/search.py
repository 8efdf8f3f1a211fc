"""The three search modes. Text and tag search are plain SQL plus Python ranking; semantic search is
reached through the SemanticService and only then imports the vector code."""

from __future__ import annotations

from flask import current_app
from sqlalchemy import func, or_, select

from . import hebrew
from .db import Item, Tag, db, item_tags

MODES = ("text", "tags", "semantic")
CANDIDATES = 500  # rows fetched by the SQL filter before ranking in Python
TITLE_WEIGHT = 2.0


def _result(item: Item, score: float, matched_tags: list | None = None) -> dict:
    result = {"id": item.id, "title": item.title, "body": item.body, "tags": [t.name for t in item.tags],
              "score": round(float(score), 4)}
    if matched_tags is not None:
        result["matched_tags"] = matched_tags
    return result


def text_search(query: str, limit: int) -> list[dict]:
    """Items whose words answer the query words (niqqud ignored, prefixes understood), best first.

    A query token holding symbols (``100%``, ``c++``, ``a_b``) must also appear literally: the
    symbols are searched for, never read as LIKE wildcards.
    """
    query_words = list(dict.fromkeys(hebrew.words(query)))
    literals = [t for t in hebrew.normalize(query).split() if not t.isalnum()]
    if not query_words and not literals:
        return []
    statement = select(Item)
    if query_words:
        # SQL narrows by substring of any form of any word; Python then scores whole words.
        patterns = sorted({form for word in query_words for form in hebrew.stems(word)})
        statement = statement.where(or_(*(_contains(p) for p in patterns)))
    for literal in literals:
        statement = statement.where(_contains(literal))
    rows = db.session.scalars(statement.order_by(Item.id.desc()).limit(CANDIDATES))
    scored = []
    for item in rows:
        title_words, body_words = set(hebrew.words(item.title)), set(hebrew.words(item.body))
        score = 0.0
        for q in query_words:
            in_title = max((hebrew.word_score(q, w) for w in title_words), default=0.0)
            in_body = max((hebrew.word_score(q, w) for w in body_words), default=0.0)
            score += max(in_title * TITLE_WEIGHT, in_body)
        score = score / (len(query_words) * TITLE_WEIGHT) if query_words else 1.0
        if score > 0:
            scored.append((score, item))
    scored.sort(key=lambda pair: (-pair[0], -pair[1].id))
    return [_result(item, score) for score, item in scored[:limit]]


def _contains(fragment: str):
    return Item.search_text.like(f"%{hebrew.escape_like(fragment)}%", escape="\\")


def parse_tags(query: str) -> list[str]:
    """Tags are separated by commas, or by spaces when there is no comma; '#' is optional."""
    parts = query.split(",") if "," in query else query.split()
    return list(dict.fromkeys(t for t in (hebrew.normalize(p).strip().lstrip("#").strip() for p in parts) if t))


def tag_search(query: str, limit: int) -> list[dict]:
    """Items carrying the query tags, exact or by prefix, ranked by how many (and how exactly) match."""
    wanted = parse_tags(query)
    if not wanted:
        return []
    conditions = [Tag.norm.like(f"{hebrew.escape_like(t)}%", escape="\\") for t in wanted]
    tags = db.session.scalars(select(Tag).where(or_(*conditions))).all()
    weights: dict[int, tuple[str, float]] = {}
    for tag in tags:
        best = max(((1.0 if tag.norm == w else 0.5) for w in wanted if tag.norm.startswith(w)), default=0.0)
        if best:  # the database's LIKE may be looser than startswith (collation): Python decides
            weights[tag.id] = (tag.name, best)
    if not weights:
        return []
    item_scores: dict[int, dict[str, float]] = {}
    for item_id, tag_id in db.session.execute(
        select(item_tags.c.item_id, item_tags.c.tag_id).where(item_tags.c.tag_id.in_(list(weights)))
    ):
        name, weight = weights[tag_id]
        item_scores.setdefault(item_id, {})[name] = weight
    norms = {name: hebrew.normalize(name) for name, _ in weights.values()}

    def coverage(matched: dict[str, float]) -> float:
        # Each wanted tag counts once, by its best-matching tag on the item: 1 exact, 0.5 prefix.
        return sum(max((wt for name, wt in matched.items() if norms[name].startswith(w)), default=0.0)
                   for w in wanted) / len(wanted)

    ranked = sorted(((coverage(m), len(m), item_id, m) for item_id, m in item_scores.items()),
                    key=lambda r: (-r[0], -r[1], -r[2]))[:limit]
    items = {i.id: i for i in db.session.scalars(select(Item).where(Item.id.in_([r[2] for r in ranked])))}
    return [_result(items[item_id], score, [{"name": n, "score": s} for n, s in sorted(matched.items())])
            for score, _, item_id, matched in ranked]


def semantic_search(query: str, limit: int) -> list[dict]:
    """Items nearest the query by cosine, through their own text and their tags."""
    service = current_app.extensions["memfit.semantic"]
    encoder = service.encoder()  # loads on first use; raises SemanticUnavailable with a reason
    from .semantic import index  # numpy and the vector code, only on this path

    settings = current_app.extensions["memfit.settings"]
    catch_up(encoder, settings.semantic_catchup_limit, settings.embedding_batch_size)
    vector = encoder.encode([query], 1)[0]
    vectors = vector_index()
    tag_hits = dict(vectors.top(encoder.fingerprint, "tag", vector, 50))
    item_hits = dict(vectors.top(encoder.fingerprint, "item", vector, max(limit * 5, 50)))
    # Items carrying one of the ten closest tags are candidates even if their own text is farther.
    top_tags = sorted(tag_hits, key=tag_hits.get, reverse=True)[:10]
    tagged = index.items_with_tags(top_tags)
    candidates = set(item_hits) | set(tagged)
    if not candidates:
        return []
    floor = min(item_hits.values()) if item_hits else 0.0
    # Score from ids alone, then load only the items that are returned.
    scored = []
    for item_id in candidates:
        own = item_hits.get(item_id, floor)
        carried = tagged.get(item_id, set())
        best_tag = max((tag_hits[t] for t in carried), default=None)
        scored.append((own if best_tag is None else 0.6 * own + 0.4 * max(best_tag, own), item_id))
    scored.sort(key=lambda entry: (-entry[0], -entry[1]))
    top = scored[:limit]
    items = {i.id: i for i in db.session.scalars(select(Item).where(Item.id.in_([i for _, i in top])))}
    results = []
    for score, item_id in top:
        item = items.get(item_id)
        if item is None:  # removed since its vector was read
            continue
        matched = sorted(({"name": t.name, "score": round(tag_hits[t.id], 4)} for t in item.tags
                          if t.id in tagged.get(item_id, ())), key=lambda m: -m["score"])
        results.append(_result(item, score, matched))
    return results


def vector_index():
    """This worker's vector store, chosen on first use: pgvector on PostgreSQL when the extension is
    there, else the bounded in-process index (a race makes two; one is kept, both are correct)."""
    extensions = current_app.extensions
    if "memfit.vectors" not in extensions:
        from .semantic import index

        settings = extensions["memfit.settings"]
        if not settings.is_sqlite and index.enable_pgvector():
            store = index.PgVectorIndex()
        else:
            store = index.VectorIndex(settings.semantic_index_max_mb * 1024 * 1024)
        extensions.setdefault("memfit.vectors", store)
    return extensions["memfit.vectors"]


def catch_up(encoder, limit: int, batch_size: int) -> int:
    """Embed up to ``limit`` tags and items that have no vector for this model yet.

    The search for missing rows is skipped while the newest tag and item ids are those this worker
    saw when it last found nothing missing (one cheap query instead of two anti-joins per request).
    """
    if limit <= 0:
        return 0
    from .semantic import index

    newest = (encoder.fingerprint, *db.session.execute(
        select(select(func.max(Tag.id)).scalar_subquery(), select(func.max(Item.id)).scalar_subquery())).one())
    memo = current_app.extensions.setdefault("memfit.caught_up", {})
    if memo.get("newest") == newest:
        return 0
    done = 0
    for kind in ("tag", "item"):
        rows = index.missing(kind, encoder.fingerprint, limit - done)
        done += index.embed_rows(encoder, kind, rows, batch_size, vector_store=vector_index())
        if done >= limit:
            return done
    memo["newest"] = newest  # nothing was left missing up to these ids
    return done


def run(mode: str, query: str, limit: int) -> list[dict]:
    return {"text": text_search, "tags": tag_search, "semantic": semantic_search}[mode](query, limit)
