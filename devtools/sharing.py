"""Memory of N processes that each load the same model artifact through the app's loader: do they share
the weights? measure() starts them together and reads /proc/PID/smaps_rollup of each while all are
alive (PSS, private and RSS sums); single_file_copy() derives the layout without sharing (a version 1
artifact: one model.onnx with the weights inside). Linux only (smaps_rollup). bench/sharing.py
reports them; tests/test_artifact.py checks the sharing.

    python -m devtools.sharing MODEL_DIR OUT.npy    # one loader process, as measure() starts it
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from devtools.gunicorn import ROOT

SENTENCES = [
    "ספרים טובים לילדים בקיץ", "טיול בגליל העליון עם נחלים", "מתכון לעוגת גבינה", "שירים עבריים ישנים",
    "חדשות הספורט של השבוע", "לימוד תכנות למתחילים", "גינון במרפסת קטנה", "סרטים ישראליים מומלצים",
    "היסטוריה של ירושלים", "ציוד לקמפינג במדבר",
]
KB = 1024


def child(model_dir: str, out: str) -> None:
    """One worker: load the artifact, encode SENTENCES, report, then stay alive until stdin closes."""
    import time

    import numpy as np

    from app.semantic.encoders import load_encoder
    from app.settings import Settings

    settings = Settings.from_env({"SEMANTIC_MODEL": model_dir, "SEMANTIC_THREADS": "1"})
    started = time.perf_counter()
    encoder = load_encoder(settings)
    load_seconds = time.perf_counter() - started
    np.save(out, encoder.encode(SENTENCES, len(SENTENCES)))
    print(json.dumps({"load_seconds": load_seconds, "model": encoder.describe()}), flush=True)
    sys.stdin.read()


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...)."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        figures[name] = int(value.split()[0])
    return figures


def measure(model_dir: Path, n: int, work: Path) -> dict:
    """Start n loader processes together and sum their memory once all have loaded and encoded."""
    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    procs, reports = [], []
    try:
        for i in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "devtools.sharing", str(model_dir), str(work / f"{i}.npy")],
                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in procs:  # a report line means that process has loaded and encoded
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"loader process exited with {proc.wait()} before reporting")
            reports.append(json.loads(line))
        figures = [smaps_rollup(p.pid) for p in procs]
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=60)
    return {
        "n": n,
        "pss_mb": round(sum(f["Pss"] for f in figures) / KB, 1),
        "uss_mb": round(sum(f["Private_Clean"] + f["Private_Dirty"] for f in figures) / KB, 1),
        "rss_mb": round(sum(f["Rss"] for f in figures) / KB, 1),
        "load_seconds": round(statistics.median(r["load_seconds"] for r in reports), 3),
        "model": reports[0]["model"],
        "embeddings": np.load(work / "0.npy"),
    }


def single_file_copy(artifact: Path, out: Path) -> Path:
    """Today's layout from a version 2 artifact: the portable graph with its weights inside, as a
    version 1 artifact (the loader still serves those)."""
    import onnx

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    onnx.save_model(onnx.load(str(artifact / "model.onnx")), str(out / "model.onnx"))
    shutil.copy(artifact / "tokenizer.json", out / "tokenizer.json")
    manifest = json.loads((artifact / "memfit_model.json").read_text())
    manifest["version"] = 1
    (out / "memfit_model.json").write_text(json.dumps(manifest, indent=2))
    return out


if __name__ == "__main__":
    child(*sys.argv[1:3])
