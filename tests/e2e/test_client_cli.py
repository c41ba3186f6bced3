"""The typed client, the `b4m` server commands and webhooks, against a real `b4m serve` process
(auth on, two tenants) on the tiny SD model."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from safetensors.torch import load_file

from b4m_client import B4MError, Client, JobFailed, verify_webhook
from b4m_core.adapter import Adapter

from ..helpers.images import write_images
from ..helpers.live import LiveServer, b4m_cli
from ..helpers.processes import free_port, scaled, wait_until
from ..helpers.webhooks import Receiver

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd_path):
    srv = LiveServer(
        tmp_path_factory.mktemp("live"),
        str(tiny_sd_path),
        preview_every=2,
        webhook_allow_private="true",
        webhook_backoff_s=0.5,
        webhook_poll_s=0.1,
    )
    yield srv
    srv.close()


def is_png(data: bytes) -> bool:
    return Image.open(io.BytesIO(data)).format == "PNG"


def test_client_end_to_end_and_tenant_isolation(server, tmp_path):
    imgs = write_images(tmp_path / "c", 0, 2)
    with (
        Client(server.url, api_key=server.keys["alice"]) as alice,
        Client(server.url, api_key=server.keys["bob"]) as bob,
    ):
        content = alice.add_content(
            sorted(imgs.glob("*.png")), class_word="dog", name="rex", steps=6, idempotency_key="client-rex"
        )
        again = alice.add_content(
            sorted(imgs.glob("*.png")), class_word="dog", name="rex", steps=6, idempotency_key="client-rex"
        )
        assert again.id == content.id  # the same request retried trains once
        # the previews draw the prompts given, each at every preview step
        style = alice.add_style(
            [(imgs / "00.png").read_bytes()],
            style_word="ink",
            name="inky",
            steps=4,
            preview_prompts=["a dog in {style} style", "a {style} cat"],
        )
        seen = []
        job = alice.wait(content.job_id, on_progress=seen.append, timeout=scaled(300))
        assert job.status == "succeeded" and job.outputs["adapter_id"]
        assert [j.progress_step for j in seen] == sorted(j.progress_step for j in seen)  # live, in order
        assert seen[-1].progress_step == 6
        # previews every 2 steps (not at the last: the result itself is the last picture)
        assert job.previews == [f"/jobs/{job.id}/previews/0", f"/jobs/{job.id}/previews/1"]
        assert is_png(alice.preview(job.id, 1)) and is_png(alice.loss_curve(job.id))
        styled = alice.wait(style.job_id, timeout=scaled(300))
        assert len(styled.previews) == 2  # step 2, two prompts
        with pytest.raises(B4MError) as err:
            alice.add_style([(imgs / "00.png").read_bytes()], style_word="ink", name="x", preview_prompts=["p"] * 5)
        assert err.value.status == 422 and "preview_prompts" in str(err.value)

        # names work where ids do; a fusion and a generation
        assert alice.resolve_asset("content", "rex").id == content.id
        fusion = alice.fuse(content.id, style.id, steps=4, preview_prompts=["a {content} in {style} style", "x"])
        fused = alice.wait(fusion.job_id, timeout=scaled(300))
        assert fused.status == "succeeded" and len(fused.previews) == 2
        done = alice.generate("a {content} in {style} style", fusion_id=fusion.id, steps=2, num_images=2, wait=120)
        assert done.images == [f"/generations/{done.id}/images/0", f"/generations/{done.id}/images/1"]
        assert is_png(alice.image(done.id, 1))
        assert is_png(alice.reference_image("content", content.id, 1))
        kohya = alice.download_adapter(alice.resolve_adapter(fusion.id), "kohya")
        assert any(k.startswith("lora_unet_") for k in json.loads(kohya[8 : 8 + int.from_bytes(kohya[:8], "little")]))

        # bob sees none of it
        assert bob.contents().total == 0
        for call in (
            lambda: bob.content(content.id),
            lambda: bob.job(job.id),
            lambda: bob.image(done.id, 0),
            lambda: bob.fuse(content.id, style.id),
        ):
            with pytest.raises(B4MError) as err:
                call()
            assert err.value.status == 404
        with pytest.raises(B4MError) as err:
            Client(server.url, api_key="b4m_wrong").contents()
        assert err.value.status == 401

        # a job that fails raises JobFailed from wait()
        doomed = alice.add_content([(imgs / "00.png").read_bytes()], class_word="dog", name="doomed", steps=500)
        alice.cancel(doomed.job_id)
        with pytest.raises(JobFailed) as failed:
            alice.wait(doomed.job_id, timeout=scaled(120))
        assert failed.value.job.status == "canceled"


def test_cli_server_commands(server, tmp_path):
    env = server.cli_env("alice")
    imgs = write_images(tmp_path / "c", 5, 2)
    r = b4m_cli(
        env, "content", "add", *sorted(imgs.glob("*.png")), "--word", "cat", "--name", "tom", "--steps", 4, "--watch"
    )
    assert r.returncode == 0, r.stderr
    end = json.loads(r.stdout.strip().splitlines()[-1])
    assert end["status"] == "succeeded" and end["adapter_id"] and end["loss_curve"].startswith(server.url)
    assert "4/4" in r.stderr and "loss=" in r.stderr  # the progress bar, fed by the job's events
    r = b4m_cli(env, "style", "add", imgs / "00.png", "--word", "chalk", "--name", "chalky", "--steps", 2, "--watch")
    assert r.returncode == 0, r.stderr
    # the flags `b4m train` takes: a folder through --images, --style-word for --word
    r = b4m_cli(env, "style", "add", "--images", imgs, "--style-word", "chalk", "--name", "folder", "--steps", 1)
    assert r.returncode == 0, r.stderr
    folder_style = json.loads(r.stdout.strip().splitlines()[-1])
    shown = json.loads(b4m_cli(env, "style", "show", folder_style["id"]).stdout)
    assert shown["images"] == 2 and shown["word"] == "chalk", shown
    r = b4m_cli(env, "style", "add", "--word", "chalk", "--name", "none")
    assert r.returncode == 2 and "give the images" in r.stderr

    r = b4m_cli(env, "content", "list")
    assert r.returncode == 0 and "tom" in r.stdout and "succeeded" in r.stdout
    assert [a["name"] for a in json.loads(b4m_cli(env, "style", "list", "--json").stdout)].count("chalky") == 1

    r = b4m_cli(env, "fuse", "tom", "chalky", "--steps", 2, "--lr", 0.002, "--seed", 7, "--watch")  # names, not ids
    assert r.returncode == 0, r.stderr
    fused = json.loads(r.stdout.strip().splitlines()[-1])
    fusion_id = json.loads(r.stdout.strip().splitlines()[0])["id"]
    made = Adapter.from_bytes(Client(server.url, api_key=env.get("B4M_API_KEY")).download_adapter(fused["adapter_id"]))
    assert made.seed == 7 and made.steps == 2  # the server form passes the make stage's settings

    r = b4m_cli(
        env,
        "generate",
        "--fusion",
        fusion_id,
        "--prompt",
        "a {content} in {style} style",
        "--steps",
        2,
        "--num-images",
        2,
        "--out",
        tmp_path / "imgs",
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2

    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"tom_chalky_{fmt}.safetensors"
        r = b4m_cli(env, "export", fusion_id, "--format", fmt, "--out", out)
        assert r.returncode == 0, r.stderr
        keys = list(load_file(out))
        assert keys and all(k.startswith("lora_unet_" if fmt == "kohya" else "unet.") for k in keys)
    # a diffusers folder: the server draws the model card's samples with the fusion
    r = b4m_cli(env, "export", fusion_id, "--format", "diffusers", "--samples", 2, "--out", tmp_path / "hub")
    assert r.returncode == 0, r.stderr
    assert (
        Image.open(tmp_path / "hub" / "samples.png").size[0] == 2 * Image.open(tmp_path / "hub" / "samples.png").size[1]
    )
    assert "![samples](samples.png)" in (tmp_path / "hub" / "README.md").read_text()
    r = b4m_cli(env, "export", fused["adapter_id"], "--format", "b4m", "--out", tmp_path / "x.safetensors")
    assert r.returncode == 0, r.stderr
    r = b4m_cli(env, "export", "tom", "--format", "b4m", "--out", tmp_path / "tom.safetensors")  # by name
    assert r.returncode == 0 and load_file(tmp_path / "tom.safetensors"), r.stderr

    r = b4m_cli(env, "jobs", "watch", fused["id"])  # an ended job: its summary at once
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "succeeded"
    assert fused["id"] in b4m_cli(env, "jobs", "list").stdout

    # the demo's flow over the API (2 x 2 shipped references), its grid written locally
    r = b4m_cli(
        env, "demo", "--url", server.url, "--quick", "--break-steps", 2, "--make-steps", 1, "--out", tmp_path / "demo"
    )
    assert r.returncode == 0, r.stderr + r.stdout
    assert Image.open(tmp_path / "demo" / "grid.png").size == (3 * 68, 3 * 68)

    # errors are one line, not a traceback, and change nothing
    r = b4m_cli(env, "fuse", "nobody", "chalky")  # not found: its own exit code, apart from usage errors (2)
    assert r.returncode == 3 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = b4m_cli({**env, "B4M_API_KEY": "b4m_wrong"}, "content", "list")
    assert r.returncode == 2 and "401" in r.stderr
    nowhere = f"http://127.0.0.1:{free_port()}"
    r = b4m_cli({**env, "B4M_URL": nowhere}, "jobs", "list")
    assert r.returncode == 4 and f"cannot reach the server at {nowhere}" in r.stderr and "b4m serve" in r.stderr
    r = b4m_cli(env, "--version")
    assert r.returncode == 0 and r.stdout.startswith("b4m ")
    r = b4m_cli(env, "content", "add", imgs / "00.png", "--word", "cat", "--name", "slow", "--steps", 3000)
    job_id = json.loads(r.stdout)["job_id"]
    b4m_cli(env, "jobs", "cancel", job_id)
    r = b4m_cli(env, "jobs", "watch", job_id)
    assert r.returncode == 1 and json.loads(r.stdout.strip().splitlines()[-1])["status"] == "canceled"


def test_webhook_signed_retried_with_backoff(server, tmp_path):
    rx = Receiver(failures=2)
    try:
        with (
            Client(server.url, api_key=server.keys["alice"]) as alice,
            Client(server.url, api_key=server.keys["bob"]) as bob,
        ):
            imgs = write_images(tmp_path / "c", 9, 1)
            r = alice.add_style(
                sorted(imgs.glob("*.png")), style_word="ink", name="hooked", steps=2, webhook_url=rx.url
            )
            wait_until(lambda: len(rx.calls) >= 3, 60, "three webhook deliveries")
            job = wait_until(
                lambda: (j := alice.job(r.job_id)).webhook.status == "delivered" and j, 10, "delivery recorded"
            )
            assert job.webhook.attempts == 3 and job.webhook.error is None
            secret = alice.webhook_secret()
            assert secret == alice.webhook_secret() and secret != bob.webhook_secret()
            for _, headers, body in rx.calls:
                event = verify_webhook(secret, headers, body)
                assert event["type"] == "job.succeeded" and event["data"]["outputs"]["adapter_id"]
                assert headers["webhook-id"] == rx.calls[0][1]["webhook-id"]  # the same on every retry: dedupe on it
                with pytest.raises(ValueError):  # another tenant's key does not verify: no forging
                    verify_webhook(bob.webhook_secret(), headers, body)
            with pytest.raises(ValueError):  # a tampered body does not verify
                verify_webhook(secret, rx.calls[0][1], rx.calls[0][2].replace(b"succeeded", b"failed"))
            gaps = [b[0] - a[0] for a, b in zip(rx.calls, rx.calls[1:])]
            assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[1] > gaps[0]  # 0.5 s, then 1 s (+ polling)
            with pytest.raises(B4MError) as err:
                alice.fuse("x", "y", webhook_url="ftp://example.com/hook")
            assert err.value.status == 422
    finally:
        rx.close()
