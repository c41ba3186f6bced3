"""A real `b4m serve` process on loopback, with tenants and API keys made by the `b4m` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .processes import free_port, run, scaled, spawn, stop


def b4m_cli(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "services.cli", *map(str, args)], env=env, timeout=timeout)


class LiveServer:
    """The embedded stack (SQLite, local store, in-process jobs) in its own process, auth on."""

    def __init__(self, data_dir: Path, base_model: str, tenants=("alice", "bob"), **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("B4M_")}
        self.env.update(
            HF_HUB_OFFLINE="1",
            B4M_DATA_DIR=str(data_dir),
            B4M_BASE_MODEL=base_model,
            B4M_AUTH="true",
            B4M_DEVICE="cpu",
            **{f"B4M_{k.upper()}": str(v) for k, v in settings.items()},
        )
        self.keys = {}
        for name in tenants:  # the operator's commands, on the server's database
            r = b4m_cli(self.env, "tenant", "create", name)
            assert r.returncode == 0, r.stderr
            r = b4m_cli(self.env, "key", "create", name)
            assert r.returncode == 0, r.stderr
            self.keys[name] = json.loads(r.stdout)["key"]
        self.log = open(data_dir / "server.log", "w")
        self.proc = spawn(
            [sys.executable, "-m", "services.cli", "serve", "--port", str(self.port)],
            owner="fixture",
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        end = time.time() + scaled(90)
        while True:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1)
                break
            except Exception:
                if time.time() > end or self.proc.poll() is not None:
                    raise AssertionError(
                        "server did not start: " + (data_dir / "server.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.3)

    def cli_env(self, tenant: str) -> dict:
        """The environment a user's shell has: server URL and key."""
        return {**self.env, "B4M_URL": self.url, "B4M_API_KEY": self.keys[tenant]}

    def close(self) -> None:
        stop(self.proc)
        self.log.close()
