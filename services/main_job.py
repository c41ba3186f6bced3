"""The main job, end to end over HTTP on the embedded stack.

Starts `b4m serve` (SQLite, local object store, in-process jobs, the micro model),
uploads the shipped held-out references with `POST /contents` and `POST /styles`
(through the typed client, `b4m_client`, as the `b4m` server commands do),
fuses every pair with `POST /fusions`, draws each with `POST /generate`, writes the
images and a content x style grid, and stops the server.

    python -m services.main_job --out out/main_job
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from b4m_client import Client
from b4m_contract.jobs import JobStatus
from b4m_core.micro.references import CONTENT_TOKEN, CONTENT_WORD, STYLE_TOKEN, STYLE_WORD, reference_folder

PROMPT = "a large {content} in {style} style in the center on a white background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress(label: str):
    """Print a job's status line whenever its status or step changes (fed by its live events)."""
    last = None

    def show(job) -> None:
        nonlocal last
        if (job.status, job.progress_step) != last:
            last = (job.status, job.progress_step)
            eta = f", eta {job.eta_seconds:.0f}s" if job.eta_seconds else ""
            print(f"  {label}: {job.status} {job.progress_step}/{job.progress_total}{eta}", flush=True)

    return show


def _upload(client: Client, kind: str, name: str, steps: int):
    images = sorted(reference_folder(kind, name).glob("*.png"))
    add = client.add_content if kind == "content" else client.add_style
    word = (CONTENT_WORD if kind == "content" else STYLE_WORD)[name]
    token = (CONTENT_TOKEN if kind == "content" else STYLE_TOKEN)[name]
    return add(images, word, name, steps=steps, token=token, idempotency_key=f"main-job-{kind}-{name}-{steps}")


def run_on(
    client: Client, out: Path, contents: list[str], styles: list[str], break_steps: int, make_steps: int
) -> dict:
    """The demo's flow on any server the client reaches: train, fuse every pair, draw one image each."""
    out.mkdir(parents=True, exist_ok=True)
    ids = {}
    for kind, names in (("content", contents), ("style", styles)):
        for name in names:
            ids[(kind, name)] = _upload(client, kind, name, break_steps)
    for (kind, name), r in ids.items():
        client.wait(r.job_id, on_progress=_progress(f"train {kind} {name}"), timeout=1800)
    cells = {}
    for c in contents:
        for s in styles:
            f = client.fuse(
                ids[("content", c)].id,
                ids[("style", s)].id,
                steps=make_steps,
                idempotency_key=f"main-job-fuse-{c}-{s}-{make_steps}",
            )
            client.wait(f.job_id, on_progress=_progress(f"fuse {c} x {s}"), timeout=1800)
            g = client.generate(PROMPT, fusion_id=f.id, seed=0, num_images=1, wait=120)
            if g.status != JobStatus.SUCCEEDED:
                client.wait(g.job_id, on_progress=_progress(f"generate {c} x {s}"), timeout=600)
            path = out / f"{c}_x_{s}.png"
            path.write_bytes(client.image(g.id, 0))
            cells[(c, s)] = Image.open(path).convert("RGB")
            print(f"  wrote {path}", flush=True)
    return cells


def run(out: Path, contents: list[str], styles: list[str], break_steps: int, make_steps: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, B4M_DATA_DIR=str(out / "data"), HF_HUB_OFFLINE="1")
    for k in ("B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_STORAGE"):
        env.pop(k, None)  # the embedded default
    log = open(out / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    t0 = time.time()
    try:
        with Client(f"http://127.0.0.1:{port}", api_key="") as client:
            for _ in range(300):
                try:
                    if client.ready().get("status") == "ok":
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise RuntimeError(f"server did not start; see {out / 'server.log'}")
            print(f"b4m serve is up on port {port}", flush=True)
            cells = run_on(client, out, contents, styles, break_steps, make_steps)
    finally:
        server.terminate()
        server.wait(timeout=30)
    save_grid(out, cells, contents, styles)
    (out / "summary.json").write_text(
        json.dumps({"seconds": time.time() - t0, "contents": contents, "styles": styles, "prompt": PROMPT}, indent=2)
    )
    print(f"grid: {out / 'grid.png'} ({time.time() - t0:.0f}s)")
    return out / "grid.png"


def save_grid(out: Path, cells, contents, styles) -> Path:
    _grid(cells, contents, styles).save(out / "grid.png")
    return out / "grid.png"


def _grid(cells, contents, styles) -> Image.Image:
    def ref(kind, name):
        return np.asarray(Image.open(sorted(reference_folder(kind, name).glob("*.png"))[0]).convert("RGB"))

    blank = np.full((64, 64, 3), 255, np.uint8)
    rows = [[blank] + [ref("style", s) for s in styles]]
    # cells at the references' size, whatever the base model draws (1024 px on SDXL)
    rows += [
        [ref("content", c)] + [np.asarray(cells[(c, s)].resize((64, 64), Image.LANCZOS)) for s in styles]
        for c in contents
    ]
    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)
    return Image.fromarray(np.concatenate([np.concatenate([pad(x) for x in r], 1) for r in rows], 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/main_job")
    ap.add_argument("--contents", nargs="+", default=["hexagon", "flower"])
    ap.add_argument("--styles", nargs="+", default=["plaid", "zigzag"])
    ap.add_argument("--break-steps", type=int, default=150)
    ap.add_argument("--make-steps", type=int, default=30)
    args = ap.parse_args()
    # a SIGTERM (make interrupted, CI timeout) must still stop the server it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(Path(args.out), args.contents, args.styles, args.break_steps, args.make_steps)


if __name__ == "__main__":
    main()
