"""app/api.py's input checks: every class of input that once reached the database or int() and gave a
500 is a 400 JSON naming the field and the problem, on SQLite and PostgreSQL (whose VARCHAR limits
and encoding SQLite does not enforce)."""

import pytest

from test_api import error_of

SURROGATE_BODIES = {
    "title": b'{"title": "a\\ud800b"}',
    "body": b'{"title": "x", "body": "\\udfff"}',
    "tags[0]": b'{"title": "x", "tags": ["\\ud83d"]}',
}


@pytest.mark.parametrize("field", sorted(SURROGATE_BODIES))
def test_unpaired_surrogates_are_refused_by_field(client, field):
    error = error_of(client.post("/items", data=SURROGATE_BODIES[field], content_type="application/json"), 400)
    assert error["message"].startswith(f"{field} contains an unpaired surrogate"), error


def test_a_paired_surrogate_escape_is_an_ordinary_character(client):
    created = client.post("/items", data=b'{"title": "\\ud83d\\ude00"}', content_type="application/json")
    assert created.status_code == 201 and created.get_json()["title"] == "\U0001F600"


@pytest.mark.parametrize("limit", ["\u0663", "\u00b2", "\uff13", "\u0969", "1" * 30, "9" * 4000, "+5", " 5", "5.0",
                                   "0x10", "1_0"])
def test_limit_takes_ascii_digits_only(client, limit):
    error = error_of(client.get("/search", query_string={"q": "ספר", "limit": limit}), 400)
    assert error["code"] == "bad_limit" and "ASCII digits" in error["message"]


@pytest.mark.parametrize("item_id", ["\u0663", "\uff11", "\u00b9", "-1", "1e3", "abc"])
def test_item_id_takes_ascii_digits_only(client, item_id):
    assert error_of(client.get(f"/items/{item_id}"), 400)["code"] == "bad_id"


@pytest.mark.parametrize("item_id", ["0", "2147483648", "9" * 5000])
def test_item_ids_that_cannot_exist_are_not_found(client, item_id):
    assert error_of(client.get(f"/items/{item_id}"), 404)["code"] == "not_found"


@pytest.mark.parametrize("depth", [1000, 20000])
def test_deeply_nested_json_is_refused(client, depth):
    nested = b"[" * depth + b"]" * depth
    for body in (nested, b'{"title": ' + nested + b"}"):
        error = error_of(client.post("/items", data=body, content_type="application/json"), 400)
        assert error["code"] == "bad_json", error


def test_a_number_too_long_to_read_is_refused(client):
    body = b'{"title": "x", "tags": [' + b"7" * 5000 + b"]}"
    assert "number too long" in error_of(client.post("/items", data=body, content_type="application/json"),
                                         400)["message"]


@pytest.mark.parametrize("text, problem", [
    ("a\x00b", "control character U+0000"),
    ("a\x1bb", "control character U+001B"),
    ("a\x85b", "control character U+0085"),
    ("\u202eabc", "bidi control U+202E"),
    ("abc\u2066", "bidi control U+2066"),
    ("a\ufffeb", "noncharacter"),
    ("a\U0010ffff", "noncharacter"),
    ("\u0301abc", "begins with a combining mark"),
    ("\u05b8\u05d0", "begins with a combining mark"),
])
@pytest.mark.parametrize("field", ["title", "body", "tags[0]"])
def test_invisible_and_reordering_characters_are_refused(client, field, text, problem):
    payload = {"title": "x", "tags": [text]} if field == "tags[0]" else {"title": "x", field: text}
    message = error_of(client.post("/items", json=payload), 400)["message"]
    assert message.startswith(f"{field} ") and problem in message, message


@pytest.mark.parametrize("q, problem", [("a\x00", "U+0000"), ("\u202eשלום", "U+202E"), ("\u0301", "combining")])
def test_the_query_is_checked_like_stored_text(client, q, problem):
    error = error_of(client.get("/search", query_string={"q": q}), 400)
    assert error["code"] == "bad_query" and problem in error["message"], error


@pytest.mark.parametrize("text", ["\u200f\u200f", "\u200b", "\u00a0\u3000", "\u2028", "\ufeff", " \u200e "])
def test_text_with_nothing_visible_is_not_a_title_or_tag(client, text):
    assert "visible text" in error_of(client.post("/items", json={"title": text}), 400)["message"]
    assert "visible text" in error_of(client.post("/items", json={"title": "x", "tags": [text]}), 400)["message"]


def test_a_tag_that_lengthens_when_normalised_is_refused_before_the_database(client):
    # 'İ'.lower() is 'i' + U+0307: 64 of them make a 128-character search form in a 64-character column.
    message = error_of(client.post("/items", json={"title": "x", "tags": ["\u0130" * 64]}), 400)["message"]
    assert message.startswith("tags[0] is too long once normalised"), message
    assert client.post("/items", json={"title": "x", "tags": ["\u0130" * 32]}).status_code == 201


@pytest.mark.parametrize("field, limit", [("title", 200), ("tags[0]", 64)])
def test_lengths_are_counted_after_nfc(client, field, limit):
    # U+FB2A (shin with shin dot) is excluded from composition: NFC makes it two characters.
    text = "\ufb2a" * (limit // 2 + 1)
    payload = {"title": "x", "tags": [text]} if field == "tags[0]" else {"title": text}
    assert "after Unicode NFC" in error_of(client.post("/items", json=payload), 400)["message"]


def test_stored_text_is_nfc_and_hebrew_marks_and_rlm_are_kept(client):
    sent = {"title": "e\u0301 שָׁלוֹם\u200f", "body": "שורה\nשורה\tב", "tags": ["#e\u0301"]}
    created = client.post("/items", json=sent)
    assert created.status_code == 201, created.data
    item = created.get_json()
    assert item["title"] == "\u00e9 שָׁלוֹם\u200f" and item["body"] == sent["body"] and item["tags"] == ["\u00e9"]


@pytest.mark.parametrize("name, shown", [("\\ud800", "\\ud800"), ("a\\u202eb", "a\\u202eb"), ("\\u0000", "\\x00")])
def test_unknown_field_names_are_echoed_escaped(client, name, shown):
    # A lone surrogate in a key cannot be encoded into the answer; a bidi control would reorder it.
    body = ('{"title": "x", "%s": 1}' % name).encode()
    message = error_of(client.post("/items", data=body, content_type="application/json"), 400)["message"]
    assert message == f"unknown field(s): '{shown}'; accepts title, body, tags", message


def test_newlines_are_body_text_not_title_text(client):
    assert "U+000A" in error_of(client.post("/items", json={"title": "a\nb"}), 400)["message"]
