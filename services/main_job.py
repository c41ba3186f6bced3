"""The main job, end to end over HTTP on the embedded stack.

Starts `b4m serve` (SQLite, local object store, in-process jobs, the micro model),
uploads the shipped held-out references with `POST /contents` and `POST /styles`,
fuses every pair with `POST /fusions`, draws each with `POST /generate`, writes the
images and a content x style grid, and stops the server.

    python -m services.main_job --out out/main_job
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from b4m_core.micro.references import CONTENT_TOKEN, CONTENT_WORD, STYLE_TOKEN, STYLE_WORD, reference_folder

PROMPT = "a large {content} in {style} style in the center on a white background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_job(client: httpx.Client, job_id: str, label: str, timeout: float = 1800) -> dict:
    t, last = time.time(), None
    while time.time() - t < timeout:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        note = (job["status"], job["progress_step"])
        if note != last:
            eta = f", eta {job['eta_seconds']:.0f}s" if job.get("eta_seconds") else ""
            print(f"  {label}: {job['status']} {job['progress_step']}/{job['progress_total']}{eta}", flush=True)
            last = note
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"{label} {job['status']}: {job['error']}")
            return job
        time.sleep(0.5)
    raise TimeoutError(label)


def _upload(client: httpx.Client, kind: str, name: str, steps: int) -> dict:
    folder = reference_folder(kind, name)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted(folder.glob("*.png"))]
    word_field = "class_word" if kind == "content" else "style_word"
    word = (CONTENT_WORD if kind == "content" else STYLE_WORD)[name]
    token = (CONTENT_TOKEN if kind == "content" else STYLE_TOKEN)[name]
    r = client.post(f"/{kind}s", files=files, data={word_field: word, "name": name, "token": token,
                                                    "steps": str(steps)},
                    headers={"Idempotency-Key": f"main-job-{kind}-{name}-{steps}"})
    return r.raise_for_status().json()


def run(out: Path, contents: list[str], styles: list[str], break_steps: int, make_steps: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, B4M_DATA_DIR=str(out / "data"), HF_HUB_OFFLINE="1")
    for k in ("B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_STORAGE"):
        env.pop(k, None)  # the embedded default
    log = open(out / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for _ in range(300):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            else:
                raise RuntimeError(f"server did not start; see {out / 'server.log'}")
            print(f"b4m serve is up on port {port}", flush=True)
            ids = {}
            for kind, names in (("content", contents), ("style", styles)):
                for name in names:
                    ids[(kind, name)] = _upload(client, kind, name, break_steps)
            for (kind, name), r in ids.items():
                _wait_job(client, r["job_id"], f"train {kind} {name}")
            cells = {}
            for c in contents:
                for s in styles:
                    f = client.post("/fusions", json={"content_id": ids[("content", c)]["id"],
                                                      "style_id": ids[("style", s)]["id"], "steps": make_steps},
                                    headers={"Idempotency-Key": f"main-job-fuse-{c}-{s}-{make_steps}"})
                    f = f.raise_for_status().json()
                    _wait_job(client, f["job_id"], f"fuse {c} x {s}")
                    g = client.post("/generate", json={"fusion_id": f["id"], "prompt": PROMPT, "seed": 0,
                                                       "num_images": 1, "wait": 120}).raise_for_status().json()
                    if g["status"] != "succeeded":
                        _wait_job(client, g["job_id"], f"generate {c} x {s}")
                        g["images"] = [f"/generations/{g['id']}/images/0"]
                    png = client.get(g["images"][0], follow_redirects=True).raise_for_status().content
                    path = out / f"{c}_x_{s}.png"
                    path.write_bytes(png)
                    cells[(c, s)] = Image.open(path).convert("RGB")
                    print(f"  wrote {path}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    grid = _grid(cells, contents, styles)
    grid.save(out / "grid.png")
    (out / "summary.json").write_text(json.dumps({"seconds": time.time() - t0, "contents": contents,
                                                  "styles": styles, "prompt": PROMPT}, indent=2))
    print(f"grid: {out / 'grid.png'} ({time.time() - t0:.0f}s)")
    return out / "grid.png"


def _grid(cells, contents, styles) -> Image.Image:
    def ref(kind, name):
        return np.asarray(Image.open(sorted(reference_folder(kind, name).glob("*.png"))[0]).convert("RGB"))

    blank = np.full((64, 64, 3), 255, np.uint8)
    rows = [[blank] + [ref("style", s) for s in styles]]
    rows += [[ref("content", c)] + [np.asarray(cells[(c, s)]) for s in styles] for c in contents]
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
