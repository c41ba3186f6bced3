"""How long an API replica takes to import and build its app, and what it loads.

Runs each case in a fresh interpreter, several times, and prints the median seconds and
whether torch was loaded; the target (issue: the house) is <= 0.8 s with no torch.

    python bench/api_import.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "import services.api.app": "import services.api.app",
    "import + create_app (Celery queue)": (
        "from services.api.app import create_app\nfrom services.common.settings import Settings\n"
        "create_app(Settings(data_dir={tmp!r}, broker_url='redis://127.0.0.1:1/0', reconcile_every_s=0))"
    ),
    "import b4m_core.training (the worker's model code, for scale)": "import b4m_core.training",
}


def measure(code: str) -> tuple[float, bool]:
    probe = (
        "import time; t = time.perf_counter()\n"
        + code
        + "\nimport sys, json; print(json.dumps([time.perf_counter() - t, 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, torch = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, code in CASES.items():
            runs = [measure(code.format(tmp=tmp)) for _ in range(args.repeats)]
            results[name] = {
                "median_s": round(statistics.median(r[0] for r in runs), 3),
                "torch_loaded": any(r[1] for r in runs),
            }
            print(f"{name:62s} {results[name]['median_s']:6.3f} s  torch={results[name]['torch_loaded']}")
    api = results["import services.api.app"]["median_s"]
    model = results["import b4m_core.training (the worker's model code, for scale)"]["median_s"]
    print(f"API import / model-code import: {api / model:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
