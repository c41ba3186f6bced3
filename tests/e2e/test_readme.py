"""README's curl walk-through runs as written, against a real `b4m serve` process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from ..helpers.processes import free_port as _free_port
from ..helpers.processes import run, spawn, stop

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- walkthrough[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert m, "README lost its walk-through block"
    return m.group(1)


def test_readme_walkthrough(tmp_path):
    env = {
        **os.environ,
        "PORT": str(_free_port()),
        "B4M_DATA_DIR": str(tmp_path / "data"),
        "B4M_DEVICE": "cpu",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }
    for f in (ROOT / "out").glob("walk_*"):
        f.unlink()
    script = "set -e\ntrap 'kill $SERVER 2>/dev/null' EXIT\n" + walkthrough()
    proc = run(["bash", "-c", script], cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert '"status":"queued"' in out.replace(" ", "")  # the 202 bodies
    assert '"images":["/generations/' in out.replace(" ", "")  # generate answered 200 within `wait`
    assert (ROOT / "out/walk_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for fmt, key in (("b4m", None), ("diffusers", "lora_A.weight"), ("kohya", "lora_down.weight")):
        with safe_open(str(ROOT / f"out/walk_{fmt}.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert keys and (key is None or any(k.endswith(key) for k in keys)), (fmt, keys[:3])
    codes = re.findall(r"^(\d{3})$", out, re.M)
    assert codes[-2:] == ["409", "204"], out[-2000:]
    lines = out.splitlines()
    # the answer of POST /jobs/{id}/cancel: the last JSON line before the 409 (the server's
    # access log shares stdout)
    cancel = [x for x in lines[: lines.index("409")] if x.startswith("{")][-1]
    assert '"type":"train_content"' in cancel and re.search(r'"status":"(canceled|running)"', cancel), cancel


def test_readme_cli_walkthrough(tmp_path):
    """The `b4m` server commands block runs as written (progress bars, names for ids, export)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- cli-walkthrough[^>]*-->\n```bash\n(.*?)```", text, re.S)
    assert m, "README lost its CLI walk-through block"
    env = {k: v for k, v in os.environ.items() if not k.startswith("B4M_")}
    env.update(
        PORT=str(_free_port()),
        B4M_DATA_DIR=str(tmp_path / "data"),
        B4M_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    walk = ROOT / "out/cli_walk"
    for f in walk.glob("*") if walk.exists() else []:
        f.unlink()
    script = "set -e\ntrap 'kill $SERVER 2>/dev/null' EXIT\n" + m.group(1)
    proc = run(["bash", "-c", script], cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "20/20" in proc.stderr  # the progress bars (training and fusion)
    assert re.search(r"^hexagon|\s hexagon\s", proc.stdout, re.M)  # the content list's table
    assert len(list(walk.glob("image_*.png"))) == 2
    with safe_open(str(walk / "hexagon_zigzag_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
        meta = f.metadata()
    # what a LoRA manager shows: how to prompt it, what it is for
    assert meta["modelspec.trigger_phrase"] == "hkx shape, zgt pattern" and meta["ss_sd_model_name"] == "micro"


def test_readme_client_example(tmp_path):
    """The README's Python client example runs as written against a `b4m serve` (micro model)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```python\n(from b4m_client import Client\n.*?)```", text, re.S)
    assert m, "README lost its client example"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("B4M_")}
    env.update(
        B4M_DATA_DIR=str(tmp_path / "data"), B4M_DEVICE="cpu", HF_HUB_OFFLINE="1", B4M_URL=f"http://127.0.0.1:{port}"
    )
    for f in (ROOT / "out").glob("flower_plaid*"):
        f.unlink()
    server = spawn(
        [sys.executable, "-m", "services.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        script = (
            "import time, httpx\nfor _ in range(300):\n    try:\n        httpx.get('"
            + env["B4M_URL"]
            + "/healthz'); break\n    except httpx.HTTPError:\n        time.sleep(0.3)\n"
            + m.group(1)
        )
        proc = run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=600)
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "succeeded 20" in proc.stdout  # on_progress saw the job end
    assert (ROOT / "out/flower_plaid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(str(ROOT / "out/flower_plaid_kohya.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
