"""Memory of N processes that each load the same model artifact: are the weights shared?

    python -m bench.sharing            # AlephBERT-architecture q8 artifact, N = 1, 2, 3

Builds (once, under bench/work/sharing) the synthetic AlephBERT-architecture model and prepares it
with ``flask --app app model prepare --precision q8``; derives from it today's single-file layout
(a version 1 artifact: one model.onnx with the weights inside). For each layout and N, starts N
processes that load the artifact through the app's loader and encode the same Hebrew sentences,
then reads /proc/PID/smaps_rollup of each while all N are alive:

  pss_mb   sum of proportional set sizes: the instance's real share, shared pages split among sharers
  uss_mb   sum of private memory (Private_Clean + Private_Dirty): what each worker adds
  rss_mb   sum of resident set sizes, shown for comparison: it counts shared pages once per process

plus the load time (loader call, seconds, median over processes) and the largest difference between
the layouts' embeddings. Writes bench/results/sharing.json. Linux only (smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "sharing"
RESULTS = ROOT / "bench" / "results"
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

    sys.path.insert(0, str(ROOT))
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
                [sys.executable, "-m", "bench.sharing", "--child", str(model_dir), str(work / f"{i}.npy")],
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


def flask(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("flask")), "--app", "app", *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--max-n", type=int, default=3, help="largest number of processes (default 3)")
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    source, artifact = WORK / "alephbert", WORK / "alephbert-q8"
    if not (source / "modules.json").exists():
        subprocess.run([sys.executable, "-m", "devtools.synthetic", str(source), "--arch", "alephbert"], cwd=ROOT,
                       check=True)
    manifest = artifact / "memfit_model.json"
    if not manifest.exists() or json.loads(manifest.read_text()).get("version") != 2:
        flask("model", "prepare", str(source), str(artifact), "--precision", "q8", "--force")
    layouts = {"single-file (v1, today)": single_file_copy(artifact, WORK / "alephbert-q8-v1"),
               "shared (v2 artifact)": artifact}
    rows, first = [], {}
    for name, path in layouts.items():
        for n in range(1, args.max_n + 1):
            row = measure(path, n, WORK / "runs")
            first.setdefault(name, row.pop("embeddings"))
            row.pop("embeddings", None)
            rows.append({"layout": name, **row})
            print(f"{name:26} N={n}  PSS {row['pss_mb']:7.1f} MB  USS {row['uss_mb']:7.1f} MB  "
                  f"RSS {row['rss_mb']:7.1f} MB  load {row['load_seconds']:.3f} s  ({row['model']['variant']})")
    old, new = first.values()
    diff = float(abs(old - new).max())
    print(f"max embedding difference between the layouts: {diff:.2e}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sharing.json").write_text(json.dumps(
        {"model": "synthetic AlephBERT architecture, q8", "sentences": len(SENTENCES), "threads": 1,
         "max_embedding_diff": diff, "runs": rows}, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
