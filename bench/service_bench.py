"""Service benchmark: API overhead on generation, read-endpoint latency under load,
and seconds from POST /fusions to a ready fused adapter. Loopback only, bounded in time.

    python bench/service_bench.py [--rate 200] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from b4m_core.generation import GenerationRequest, Generator
from b4m_core.micro.references import reference_folder
from b4m_core.models import load_base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_job(c: httpx.Client, job_id: str, timeout: float = 900) -> dict:
    t = time.time()
    while time.time() - t < timeout:
        j = c.get(f"/jobs/{job_id}").json()
        if j["status"] in ("succeeded", "failed", "canceled"):
            assert j["status"] == "succeeded", j
            return j
        time.sleep(0.05)
    raise TimeoutError(job_id)


async def load(base_url: str, paths: list[str], rate: float, seconds: float) -> list[float]:
    """Open-loop load: requests start on a fixed schedule, whatever the answers' speed."""
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10, limits=httpx.Limits(max_connections=64)) as client:

        async def one(path):
            t = time.perf_counter()
            r = await client.get(path)
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

        tasks, start, n = [], time.perf_counter(), int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(paths[i % len(paths)])))
        await asyncio.gather(*tasks)
    return lat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--break-steps", type=int, default=50)
    ap.add_argument("--make-steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp())
    port = free_port()
    env = dict(os.environ, B4M_DATA_DIR=str(data))
    for k in ("B4M_DATABASE_URL", "B4M_BROKER_URL", "B4M_STORAGE"):
        env.pop(k, None)
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res = {}
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        for _ in range(300):
            try:
                if c.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        ids = {}
        for kind, name, word in (("content", "hexagon", "shape"), ("style", "plaid", "pattern")):
            files = [
                ("images", (p.name, p.read_bytes(), "image/png"))
                for p in sorted(reference_folder(kind, name).glob("*.png"))
            ]
            r = c.post(
                f"/{kind}s",
                files=files,
                data={
                    ("class_word" if kind == "content" else "style_word"): word,
                    "name": name,
                    "steps": str(args.break_steps),
                },
            ).json()
            wait_job(c, r["job_id"])
            ids[kind] = r["id"]
        t = time.perf_counter()
        f = c.post(
            "/fusions", json={"content_id": ids["content"], "style_id": ids["style"], "steps": args.make_steps}
        ).json()
        wait_job(c, f["job_id"])
        res["post_fusion_to_ready_s"] = time.perf_counter() - t
        print(f"POST /fusions -> ready fused adapter ({args.make_steps} steps): {res['post_fusion_to_ready_s']:.2f} s")

        # generation through the API (warm worker) vs straight through b4m_core
        body = {"prompt": "a large striped star in the center on a white background", "steps": 20, "wait": 60}
        c.post("/generate", json=body)  # warm-up: loads the base in the worker
        api_t = []
        for i in range(5):
            t = time.perf_counter()
            r = c.post("/generate", json={**body, "seed": i})
            assert r.status_code == 200, r.text
            api_t.append(time.perf_counter() - t)
        gen = Generator(load_base("micro"))
        gen.generate(GenerationRequest(body["prompt"], steps=20))
        core_t = []
        for i in range(5):
            t = time.perf_counter()
            gen.generate(GenerationRequest(body["prompt"], steps=20, seed=i))
            core_t.append(time.perf_counter() - t)
        res["generate_api_s"], res["generate_core_s"] = statistics.median(api_t), statistics.median(core_t)
        res["api_over_core"] = res["generate_api_s"] / res["generate_core_s"]
        print(
            f"generation: API {res['generate_api_s']:.3f} s, b4m_core {res['generate_core_s']:.3f} s "
            f"-> {res['api_over_core']:.3f}x (target <= 1.2)"
        )

        jobs = [j["id"] for j in c.get("/jobs", params={"limit": 20}).json()["items"]]
        paths = [f"/jobs/{j}" for j in jobs] + ["/jobs?limit=20", "/contents", "/styles"]
        lat = asyncio.run(load(f"http://127.0.0.1:{port}", paths, args.rate, args.seconds))
        lat.sort()
        res["read_p50_ms"] = 1000 * lat[len(lat) // 2]
        res["read_p99_ms"] = 1000 * lat[int(len(lat) * 0.99) - 1]
        res["read_requests"] = len(lat)
        print(
            f"read endpoints at {args.rate:.0f} req/s for {args.seconds:.0f} s: p50 {res['read_p50_ms']:.1f} ms, "
            f"p99 {res['read_p99_ms']:.1f} ms (target < 20)"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
