"""The project run from outside, as the measurements and the tests run it: its flask CLI in a
subprocess (this tree or another release's), a tier's environment (deploy/env/<tier>.env), the
AlephBERT-architecture models the memory measurements serve (built once under bench/work/models), and
the settings of a throwaway app (SQLite in a folder, no model)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from devtools.gunicorn import ROOT

WORK = ROOT / "bench" / "work"  # the measurements' scratch space and model cache (git-ignored)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def flask_in(cwd: Path, *args: str, env: dict | None = None, timeout: float | None = 600) -> str:
    """`flask --app app ARGS` run in the source tree cwd (first on the child's sys.path, so that tree's
    `app` is imported: another release's, from git archive); raises RuntimeError instead of exiting, so
    a caller can record the failure and go on."""
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=cwd, capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"flask {' '.join(args)} in {cwd} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def flask(*args: str, env: dict | None = None) -> str:
    """`flask --app app ARGS` in this tree; a failure ends the run with the command's error output."""
    try:
        return flask_in(ROOT, *args, env=env, timeout=None)  # a model's preparation takes what it takes
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None


def machine_facts() -> dict:
    """What makes one machine's figures differ from another's at the same code: the CPU's model, whether
    it has the int8 dot-product instructions ONNX Runtime's q8 kernels use (AVX-512 VNNI, AVX-VNNI, AMX:
    without them a q8 model run costs several times as much), and a reference loop of pure Python
    (the request stack's speed), timed here."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    started = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return {"cpu_model": model, "int8_instructions": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}),
            "avx2": "avx2" in flags, "reference_loop_ms": round((time.perf_counter() - started) * 1000)}


def describe_cpu(machine: dict) -> str:
    """A report's words on the CPU, from machine_facts: e.g. " (AMD EPYC; AVX2, no int8 dot-product
    instructions ...; reference Python loop 364 ms)"; empty for a run recorded before they were kept."""
    if "cpu_model" not in machine:
        return ""
    int8 = ", ".join(machine["int8_instructions"]) or "no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX)"
    return (f" ({machine['cpu_model']}; {'AVX2, ' if machine['avx2'] else ''}{int8}; reference Python loop "
            f"{machine['reference_loop_ms']} ms)")


def remove_database(db_path: Path) -> None:
    """A bench's SQLite file gone with everything beside it: its WAL and shared-memory files, and the
    shared vector index folder the app keeps beside it (<file>.vectors, app/semantic/shared.py) —
    left over, it would make the next run's workers rebuild the index at their start."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{db_path}.vectors", ignore_errors=True)


def models() -> dict[str, Path]:
    """AlephBERT-architecture models, built once and cached under bench/work/models."""
    base = WORK / "models"
    paths = {"fp32": base / "alephbert-st", "q8": base / "alephbert-q8", "onnx-fp32": base / "alephbert-onnx-fp32"}
    if not (paths["fp32"] / "modules.json").exists():
        log("building the AlephBERT-architecture model (random weights)")
        subprocess.run([sys.executable, "-m", "devtools.synthetic", str(paths["fp32"]), "--arch", "alephbert"], cwd=ROOT, check=True)
    if not (paths["q8"] / "memfit_model.json").exists():
        log("preparing the q8 ONNX artifact with `flask model prepare`")
        flask("model", "prepare", str(paths["fp32"]), str(paths["q8"]), "--precision", "q8", "--max-seq-length", "512")
    if not (paths["onnx-fp32"] / "memfit_model.json").exists():
        log("preparing the fp32 ONNX artifact (the full-precision alternative for the 1 GB tier)")
        flask("model", "prepare", str(paths["fp32"]), str(paths["onnx-fp32"]), "--precision", "fp32",
              "--max-seq-length", "512")
    return paths


def tier_env(tier: str, tree: Path = ROOT) -> dict[str, str]:
    """The variables of the source tree's deploy/env/<tier>.env (generated from deploy/tiers.yaml by make
    manifests); tree: another release's, to serve it with its own tier settings."""
    env = {}
    for line in (tree / "deploy" / "env" / f"{tier}.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def make_settings(folder: Path, **env: str):
    """Settings of a throwaway app whose files all live in folder: SQLite there, no model, no memory
    checks; env adds or overrides variables."""
    from app.settings import Settings

    base = {"APP_ENV": "test", "DATABASE_URL": f"sqlite:///{folder / 'test.sqlite3'}",
            "SEMANTIC_MODEL": str(folder / "no-model"), "MEMORY_CHECK_INTERVAL": "3600"}
    base.update(env)
    return Settings.from_env(base, instance_path=str(folder / "instance"))
