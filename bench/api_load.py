"""The API under many waiting clients: liveness and a sync route's latency, how late waiters
answer, how long a SIGTERM takes with streams open, side by side with an older commit.

A production-shaped API (`b4m serve` with a Celery queue on Redis and no worker, so every
job stays queued) gets W clients in `POST /generate` with `wait` and R clients following
`GET /jobs/{id}/events`; meanwhile `/healthz` and `GET /jobs` are timed. Then SIGTERM.

    python bench/api_load.py --waiters 200 --readers 200 --wait 10 --compare-ref 5b6dd04

Needs Redis on 127.0.0.1:6379 (database 9 is flushed) and git for --compare-ref.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
REDIS_DB = 9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn) -> float:
    t = time.perf_counter()
    try:
        fn()
    except httpx.HTTPError:
        return float("inf")  # timed out
    return time.perf_counter() - t


def run_load(tree: Path, waiters: int, readers: int, wait: float) -> dict:
    import redis

    redis.Redis(db=REDIS_DB).flushdb()
    port, data = free_port(), tempfile.mkdtemp(prefix="b4m-load-")
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("B4M_")}
    env.update(
        HF_HUB_OFFLINE="1",
        B4M_DATA_DIR=data,
        B4M_BROKER_URL=f"redis://127.0.0.1:6379/{REDIS_DB}",
        B4M_RECONCILE_EVERY_S="0",
        PYTHONPATH=str(tree),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # one queued job for the readers to follow (the first request makes the default tenant)
        job = httpx.post(f"{url}/generate", json={"prompt": "followed"}, timeout=30).json()["job_id"]
        late: list[float] = []

        def waiter(i: int) -> None:
            t = time.perf_counter()
            try:
                httpx.post(f"{url}/generate", json={"prompt": f"w{i}", "wait": wait}, timeout=wait + 120)
                late.append(time.perf_counter() - t - wait)
            except httpx.HTTPError:
                late.append(float("inf"))

        def reader() -> None:
            try:
                with httpx.stream("GET", f"{url}/jobs/{job}/events", timeout=wait + 120) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=waiter, args=(i,), daemon=True) for i in range(waiters)]
        threads += [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
        for t in threads:
            t.start()
        time.sleep(1.5)  # everyone is in
        health, lists = [], []
        end = time.perf_counter() + wait * 0.7
        while time.perf_counter() < end:
            health.append(timed(lambda: httpx.get(f"{url}/healthz", timeout=wait + 30)))
            lists.append(timed(lambda: httpx.get(f"{url}/jobs?limit=5", timeout=wait + 30)))
            time.sleep(0.2)
        for t in threads[:waiters]:
            t.join(timeout=wait + 130)
        sigterm = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
            stop_s = time.perf_counter() - sigterm
        except subprocess.TimeoutExpired:
            stop_s = float("inf")
        return {
            "healthz_p50_ms": 1000 * statistics.median(health),
            "healthz_max_ms": 1000 * max(health),
            "jobs_list_p50_ms": 1000 * statistics.median(lists),
            "jobs_list_max_ms": 1000 * max(lists),
            "waiter_late_max_s": max(late) if late else float("nan"),
            "waiters_answered": sum(x != float("inf") for x in late),
            "sigterm_to_exit_s": stop_s,
        }
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        redis.Redis(db=REDIS_DB).flushdb()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waiters", type=int, default=200)
    ap.add_argument("--readers", type=int, default=200)
    ap.add_argument("--wait", type=float, default=10.0, help="each waiter's `wait` seconds")
    ap.add_argument("--compare-ref", default=None, help="a git ref to measure side by side (a temporary worktree)")
    args = ap.parse_args()
    trees = {"this tree": ROOT}
    tmp = None
    if args.compare_ref:
        tmp = tempfile.mkdtemp(prefix="b4m-ref-")
        subprocess.run(
            ["git", "worktree", "add", "--detach", tmp, args.compare_ref], cwd=ROOT, check=True, capture_output=True
        )
        trees = {args.compare_ref: Path(tmp), **trees}
    results = {}
    try:
        for name, tree in trees.items():
            results[name] = run_load(tree, args.waiters, args.readers, args.wait)
            print(name, json.dumps({k: round(v, 3) for k, v in results[name].items()}), flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, capture_output=True)
    if len(results) == 2:
        old, new = results[args.compare_ref], results["this tree"]
        print(f"{'metric':24s} {args.compare_ref:>12s} {'this tree':>12s} {'ratio':>8s}")
        for k in new:
            ratio = old[k] / new[k] if new[k] else float("nan")
            print(f"{k:24s} {old[k]:12.3f} {new[k]:12.3f} {ratio:8.1f}x")


if __name__ == "__main__":
    main()
