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
the layouts' embeddings (devtools/sharing.py measures). Writes bench/results/sharing.json. Linux only
(smaps_rollup).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from devtools import project
from devtools.gunicorn import ROOT
from devtools.project import flask
from devtools.sharing import SENTENCES, measure, single_file_copy

WORK = project.WORK / "sharing"
RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=3, help="largest number of processes (default 3)")
    args = parser.parse_args(argv)
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
