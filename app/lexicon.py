"""The Hebrew lexicon behind the text analyzer: Hspell's word list, lemmas and prefix rules as one
compact file that every process memory-maps.

Hspell (Debian package ``hspell``, /usr/share/hspell) lists ~470,000 inflected Hebrew forms without
their one-letter prefixes, each with the lemmas it can be a form of and a specifier byte saying which
prefixes may stand before it (ה "the" never before a construct form, ל before an infinitive stem).
Its files are gzip streams read in order: ``hebrew.wgz`` the sorted words (a run of digits ends a word
and says how many letters the next one takes back), ``.prefixes`` one specifier byte a word, ``.stems``
one line a word of three-character base-94 indices of its lemmas in the word list.

Which prefix strings exist and which specifiers each accepts is not in those files (Hspell compiles it
into its binary), so ``build`` asks the ``hspell`` command itself: every combination of up to
MAX_PREFIX prefix letters before one word of each specifier, and reads back the splits it accepts.
It also asks ``hspell -l`` to describe every word (0.3 s for all of them), to leave out lemmas a word
reaches only as a verb with an object pronoun, and Hspell's "miscellaneous" lemma of names.

The built file (FILE, ~17 MB) holds the words in ISO-8859-8 (one byte a letter), their specifiers and
lemma lists, and an open-addressing hash table over them: a look-up is a CRC-32 and one or two probes
into pages the operating system shares between every worker that maps the same file (a Python dict of
the same words would cost each worker ~80 MB). ``get()`` maps it on first use; when the file is
missing it is built there from the installed Hspell, and without Hspell the analyzer keeps its rules
(``None``: app/hebrew.py says which in ``analyzer_version()``).

    python -m app.lexicon build [--source /usr/share/hspell] [--output PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import logging
import mmap
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path("/usr/share/hspell")
FILE = Path(__file__).resolve().parent / "data" / "hebrew-lexicon.bin"
MAGIC = b"MEMFITLX"
# The file's layout and the rules that made it: a file of another format is built again.
FORMAT = 2
ENCODING = "iso-8859-8"  # Hspell's own: one byte a Hebrew letter
PREFIX_LETTERS = "והבכלמש"
# Longest prefix string tried (ושכשה... exist but are vanishingly rare; today's rules stop at three).
MAX_PREFIX = 4
# Hspell writes acronyms with " and abbreviations with '; app/hebrew.py's normalize() drops both.
_QUOTES = str.maketrans("", "", "\"'")
# Hspell's lemma for words outside its paradigms (names, acronyms, foreign words: ~1,600 of them):
# "miscellaneous", no lemma to share. Such a word is its own lemma here, or every name would meet every other.
MISC_LEMMA = "שונות"


# --- reading Hspell's files -------------------------------------------------------------------------

def _words(raw: bytes) -> list[bytes]:
    """The word list of a decompressed hebrew.wgz: letters, and digits saying how far to go back."""
    words, word, i, n = [], bytearray(), 0, len(raw)
    while i < n:
        c = raw[i]
        if 48 <= c <= 57:
            words.append(bytes(word))
            back = 0
            while i < n and 48 <= raw[i] <= 57:
                back = back * 10 + raw[i] - 48
                i += 1
            del word[len(word) - back:]
            continue
        word.append(c)
        i += 1
    words.append(bytes(word))
    return words


def _lemma_indices(line: bytes) -> list[int]:
    return [(line[k] - 33) + (line[k + 1] - 33) * 94 + (line[k + 2] - 33) * 8836 for k in range(0, len(line) - 2, 3)]


def _read_source(source: Path) -> tuple[list[str], bytes, list[list[int]]]:
    base = source / "hebrew.wgz"
    words = [w.decode(ENCODING) for w in _words(gzip.open(base, "rb").read())]
    specifiers = gzip.open(f"{base}.prefixes", "rb").read()
    stems = gzip.open(f"{base}.stems", "rb").read().split(b"\n")
    if len(specifiers) != len(words) or len(stems) < len(words):
        raise ValueError(f"{source}: {len(words)} words but {len(specifiers)} specifiers and {len(stems)} stem lines")
    return words, specifiers, [_lemma_indices(stems[i]) for i in range(len(words))]


def _prefix_rules(words: list[str], specifiers: bytes, hspell: str) -> dict[str, int]:
    """Each prefix string Hspell accepts, with the set of specifiers it accepts as a 256-bit mask.

    One plain word of each specifier (five letters or more, no initial ו, whose waw rule would
    interfere) is tried behind every combination of prefix letters; ``hspell -l`` names the split it
    found ("צירוף חוקי: וה+ספרים"), so a longer word found inside the try cannot be mistaken for it.
    """
    sample: dict[int, str] = {}
    for word, specifier in zip(words, specifiers):
        if specifier not in sample and len(word) >= 5 and word[0] != "ו" and word.isalpha():
            sample[specifier] = word
    of_word = {word: specifier for specifier, word in sample.items()}
    candidates = [""] + ["".join(p) for n in range(1, MAX_PREFIX + 1) for p in itertools.product(PREFIX_LETTERS, repeat=n)]
    tries = "\n".join(p + word for word in sample.values() for p in candidates) + "\n"
    out = subprocess.run([hspell, "-l"], input=tries.encode(ENCODING), capture_output=True, check=False).stdout
    rules: dict[str, int] = {}
    for line in out.decode(ENCODING).splitlines():
        if line.startswith("\t") or ": " not in line:
            continue
        found = line.split(": ", 1)[1]
        prefix, _, word = found.rpartition("+")
        if word in of_word and prefix in candidates:
            rules[prefix] = rules.get(prefix, 0) | (1 << of_word[word])
    if "" not in rules or "ה" not in rules:
        raise RuntimeError(f"{hspell} -l accepted no plain word: is it Hspell with morphology (-l)?")
    return rules


def _object_suffix_lemmas(words: list[str], hspell: str) -> dict[str, set[str]]:
    """For each word, the lemmas it reaches only as a verb with an object pronoun (ספרים as "count
    them!", שולחן as "sends them"): literary forms that would tie everyday nouns to unrelated verbs.
    ``hspell -l`` describes each reading of a word as written ("ספר(פ,...,ציווי,כינוי/ז,3,רבים)")."""
    tries = ("\n".join(words) + "\n").encode(ENCODING)
    out = subprocess.run([hspell, "-l"], input=tries, capture_output=True, check=False).stdout.decode(ENCODING)
    dropped: dict[str, set[str]] = {}
    word, suffixed, other = None, set(), set()
    for line in out.splitlines() + [""]:
        if line.startswith("\t"):
            if word is not None:
                lemma, _, description = line[1:].partition("(")
                (suffixed if description.startswith("פ") and "כינוי" in description else other).add(lemma)
            continue
        if word is not None and suffixed - other:
            dropped[word] = suffixed - other
        word, suffixed, other = None, set(), set()
        if line.startswith("מילה חוקית: "):  # the word alone; "צירוף חוקי" blocks are prefixed readings
            word = line.split(": ", 1)[1]
    return dropped


def _source_id(source: Path) -> str:
    digest = hashlib.sha256()
    for name in ("hebrew.wgz", "hebrew.wgz.prefixes", "hebrew.wgz.stems"):
        digest.update((source / name).read_bytes())
    return digest.hexdigest()[:12]


# --- the built file ---------------------------------------------------------------------------------

def build(source: Path = SOURCE, output: Path = FILE, hspell: str | None = None) -> dict:
    """Write the lexicon file from an installed Hspell (atomically: readers never see half of it)."""
    started = time.monotonic()
    hspell = hspell or shutil.which("hspell")
    if not hspell:
        raise FileNotFoundError("the hspell command is not installed (Debian package hspell)")
    words, specifiers, stems = _read_source(Path(source))
    rules = _prefix_rules(words, specifiers, hspell)
    literary = _object_suffix_lemmas(words, hspell)
    # Keys as app/hebrew.py's normalize() leaves words: without quotes. The few forms that then
    # coincide (an acronym and a word) are merged: any of their readings may be meant.
    merged: dict[str, tuple[int, set[str]]] = {}
    for word, specifier, lemmas in zip(words, specifiers, stems):
        key = word.translate(_QUOTES)
        if not key:
            continue
        spec, known = merged.get(key, (0, set()))
        skip = literary.get(word, ())
        known.update(key if words[i] == MISC_LEMMA and key != MISC_LEMMA else words[i].translate(_QUOTES)
                     for i in lemmas if i < len(words) and words[i] not in skip)
        merged[key] = (spec | specifier, known)
    keys = sorted(merged)
    index = {key: i for i, key in enumerate(keys)}
    encoded = [key.encode(ENCODING) for key in keys]
    word_offsets, blob = [0], bytearray()
    for word in encoded:
        blob += word
        word_offsets.append(len(blob))
    lemma_offsets, lemma_ids = [0], []
    for key in keys:
        lemma_ids.extend(sorted(index[lemma] for lemma in merged[key][1] if lemma in index))
        lemma_offsets.append(len(lemma_ids))
    slots = 1 << (2 * len(keys) - 1).bit_length()  # a power of two at least twice the words: short probes
    table = [0] * slots
    for i, word in enumerate(encoded):
        h = zlib.crc32(word) & (slots - 1)
        while table[h]:
            h = (h + 1) & (slots - 1)
        table[h] = i + 1
    sections = {
        "blob": bytes(blob),
        "word_offsets": struct.pack(f"<{len(word_offsets)}I", *word_offsets),
        "specifiers": bytes(merged[key][0] for key in keys),
        "lemma_offsets": struct.pack(f"<{len(lemma_offsets)}I", *lemma_offsets),
        "lemmas": struct.pack(f"<{len(lemma_ids)}I", *lemma_ids),
        "slots": struct.pack(f"<{slots}I", *table),
    }
    header = {"format": FORMAT, "words": len(keys), "slots": slots, "prefixes": rules,
              "source": str(source), "source_id": _source_id(Path(source)), "max_prefix": MAX_PREFIX}
    body, position = [], 0
    offsets = {}
    for name, data in sections.items():
        pad = (-position) % 4
        body.append(b"\0" * pad)
        position += pad
        offsets[name] = [position, len(data)]
        body.append(data)
        position += len(data)
    header["sections"] = offsets
    head = json.dumps(header, ensure_ascii=False).encode()
    head += b" " * ((-len(head) - len(MAGIC) - 4) % 4)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC + struct.pack("<I", len(head)) + head)
            for part in body:
                handle.write(part)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"words": len(keys), "prefixes": len(rules), "bytes": output.stat().st_size,
            "seconds": round(time.monotonic() - started, 2), "source_id": header["source_id"], "path": str(output)}


class Lexicon:
    """A memory-mapped lexicon file: look a word up, read its specifier and lemmas, test a prefix."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a lexicon file")
        (size,) = struct.unpack_from("<I", self._map, len(MAGIC))
        start = len(MAGIC) + 4
        self.header = json.loads(bytes(self._map[start:start + size]))
        if self.header.get("format") != FORMAT:
            raise ValueError(f"{path}: lexicon format {self.header.get('format')}, this code reads {FORMAT}")
        base = start + size
        view = memoryview(self._map)

        def section(name: str) -> memoryview:
            offset, length = self.header["sections"][name]
            return view[base + offset:base + offset + length]

        self._blob = section("blob")
        self._word_offsets = section("word_offsets").cast("I")
        self._specifiers = section("specifiers")
        self._lemma_offsets = section("lemma_offsets").cast("I")
        self._lemmas = section("lemmas").cast("I")
        self._slots = section("slots").cast("I")
        self._mask = self.header["slots"] - 1
        self.prefixes: dict[str, int] = self.header["prefixes"]
        self.max_prefix: int = self.header["max_prefix"]
        self.id = f"hspell-{self.header['source_id']}-{FORMAT}"

    def __len__(self) -> int:
        return self.header["words"]

    def find(self, word: str) -> int:
        """The index of a (normalised, unprefixed) word, or -1 when Hspell does not list it."""
        try:
            key = word.encode(ENCODING)
        except UnicodeEncodeError:
            return -1
        slots, offsets, blob = self._slots, self._word_offsets, self._blob
        h = zlib.crc32(key) & self._mask
        while True:
            entry = slots[h]
            if not entry:
                return -1
            start, end = offsets[entry - 1], offsets[entry]
            if end - start == len(key) and blob[start:end] == key:
                return entry - 1
            h = (h + 1) & self._mask

    def word(self, index: int) -> str:
        return bytes(self._blob[self._word_offsets[index]:self._word_offsets[index + 1]]).decode(ENCODING)

    def accepts(self, prefix: str, index: int) -> bool:
        """Whether Hspell allows this prefix string ("" for none) before the word at index."""
        rule = self.prefixes.get(prefix)
        return rule is not None and bool((rule >> self._specifiers[index]) & 1)

    def lemmas(self, index: int) -> list[str]:
        return [self.word(i) for i in self._lemmas[self._lemma_offsets[index]:self._lemma_offsets[index + 1]]]

    def close(self) -> None:
        for view in (self._blob, self._word_offsets, self._specifiers, self._lemma_offsets, self._lemmas, self._slots):
            view.release()
        self._map.close()


_lock = threading.Lock()
_loaded: dict[Path, Lexicon | None] = {}


def _current(path: Path) -> bool:
    """Whether path holds a lexicon of this code's FORMAT (the header's start says)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(MAGIC) + 64)
    except OSError:
        return False
    return head.startswith(MAGIC) and f'{{"format": {FORMAT},'.encode() in head


def get(path: Path = FILE, source: Path = SOURCE) -> Lexicon | None:
    """The lexicon at path, mapped once per process; built there first from an installed Hspell when
    missing. None, with one warning, when there is neither: the analyzer then keeps its rules."""
    path = Path(path)
    found = _loaded.get(path, False)
    if found is not False:
        return found
    with _lock:
        if path in _loaded:
            return _loaded[path]
        lexicon = None
        try:
            if not _current(path) and (Path(source) / "hebrew.wgz").exists() and shutil.which("hspell"):
                log.info("building the Hebrew lexicon %s from %s", path, source)
                build(source, path)
            if path.exists():
                lexicon = Lexicon(path)
            else:
                log.warning("no Hebrew lexicon at %s and no Hspell to build one (apt-get install hspell): "
                            "the text analyzer strips prefixes by rule and meets no inflection", path)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("Hebrew lexicon %s unusable (%s): the text analyzer keeps its rules", path, exc)
        _loaded[path] = lexicon
        return lexicon


def forget() -> None:
    """Drop the mapped lexicons (tests that build their own)."""
    with _lock:
        _loaded.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("build", help="build the lexicon file from an installed Hspell")
    make.add_argument("--source", type=Path, default=SOURCE)
    make.add_argument("--output", type=Path, default=FILE)
    args = parser.parse_args()
    print(json.dumps(build(args.source, args.output)))


if __name__ == "__main__":
    main()
