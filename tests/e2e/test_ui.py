"""The web UI end to end in headless Chromium (Debian's, driven by Playwright), against a real
`b4m serve` with auth on and the shipped micro model: upload 2 contents and 2 styles, watch
them train, fuse every cell of the matrix by clicking it, open a cell's samples, generate
(negative prompt, guidance, strength, content and style scales), download adapters in every format, cancel a job,
delete a fusion, delete-and-retry a canceled one, delete an asset.

`B4M_UI_SCREENSHOT=docs/ui.png` also writes the final page there (`B4M_UI_STEPS` sets the
break steps: more make a better picture; the test's default keeps it short)."""

from __future__ import annotations

import os
import re
import shutil
from typing import get_args

import httpx
import pytest
from safetensors import safe_open

from b4m_contract.schemas import Scheduler
from b4m_core.micro.references import CONTENT_TOKEN, CONTENT_WORD, STYLE_TOKEN, STYLE_WORD, reference_folder

from ..helpers.live import LiveServer
from ..helpers.processes import scaled

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
CONTENTS, STYLES = ("hexagon", "flower"), ("zigzag", "plaid")
STEPS = int(os.environ.get("B4M_UI_STEPS", "6"))


@pytest.fixture
def server(tmp_path):
    srv = LiveServer(tmp_path, "micro", tenants=("designer",), preview_every=5)
    yield srv
    srv.close()


def test_ui_upload_watch_fuse_browse_generate(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    blob = re.compile(r"^blob:")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 1200})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")  # redirects to /ui/
        expect(page).to_have_title(re.compile("B4M"))
        expect(page.locator("#server-status")).to_contain_text("401")  # no key yet: the server refuses
        page.fill("#api-key", server.keys["designer"])
        page.press("#api-key", "Enter")
        page.locator("#api-key").blur()
        expect(page.locator("#server-status")).to_have_text("")

        for kind, names, words, tokens in (
            ("content", CONTENTS, CONTENT_WORD, CONTENT_TOKEN),
            ("style", STYLES, STYLE_WORD, STYLE_TOKEN),
        ):
            for name in names:
                form = page.locator(f"#{kind}-form")
                form.locator("input[name=images]").set_input_files(sorted(reference_folder(kind, name).glob("*.png")))
                form.locator("input[name=word]").fill(words[name])
                form.locator("input[name=name]").fill(name)
                form.locator("input[name=token]").fill(tokens[name])
                form.locator("input[name=steps]").fill(str(STEPS))
                form.locator("button").click()
                expect(form.locator("input[name=name]")).to_have_value("")  # accepted: the form resets
        # watch training: a progress bar per job, live, until all four succeed
        jobs = page.locator("#jobs li")
        expect(jobs).to_have_count(4)
        expect(page.locator("#jobs li[data-status=running] progress").first).to_be_visible(timeout=scaled(60_000))
        expect(page.locator("#jobs li[data-status=succeeded]")).to_have_count(4, timeout=scaled(600_000))
        expect(page.locator("#jobs li .previews img").first).to_have_attribute("src", blob)  # previews shown
        expect(page.locator("#jobs li .status").first).to_contain_text(f"{STEPS}/{STEPS}")

        # the library: reference thumbnails on both axes, every cell empty; click each to fuse it
        expect(page.locator("#matrix th img[src^='blob:']")).to_have_count(4)
        page.fill("#fusion-steps", "4")
        for c in CONTENTS:
            for s in STYLES:
                cell = page.locator(f"td[data-content='{c}'][data-style='{s}']")
                expect(cell).to_have_class(re.compile("empty"))
                cell.click()
                expect(cell).not_to_have_class(re.compile("empty"))
        filled = page.locator("#matrix td.filled img")
        expect(filled).to_have_count(4, timeout=scaled(600_000))  # fused, then sampled: a thumbnail each
        for i in range(4):
            expect(filled.nth(i)).to_have_attribute("src", blob)

        # a filled cell shows its samples
        page.locator(f"td[data-content='{CONTENTS[0]}'][data-style='{STYLES[1]}']").click()
        expect(page.locator("#samples")).to_be_visible()
        expect(page.locator("#samples-title")).to_have_text(f"{CONTENTS[0]} × {STYLES[1]}")
        expect(page.locator("#sample-images img[src^='blob:']")).to_have_count(4)

        # the generate form
        page.select_option("#generate-fusion", label=f"{CONTENTS[1]} × {STYLES[0]}")
        page.fill("#generate-form input[name=num_images]", "3")
        page.locator("#generate-form button").click()
        expect(page.locator("#generated img[src^='blob:']")).to_have_count(3, timeout=scaled(120_000))

        # bad input: a clear message, nothing made
        form = page.locator("#content-form")
        form.locator("input[name=images]").set_input_files(
            files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}]
        )
        form.locator("input[name=word]").fill("shape")
        form.locator("input[name=name]").fill("broken")
        form.locator("button").click()
        expect(page.locator("#form-error")).to_contain_text("422")
        assert not errors, errors

        shot = tmp_path / "ui.png"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("B4M_UI_SCREENSHOT"):
            shutil.copy(shot, os.environ["B4M_UI_SCREENSHOT"])
        page.locator("#form-error").evaluate("el => el.textContent = ''")

        # generate with every option of the form; the API records what was asked
        form = page.locator("#generate-form")
        form.locator("input[name=negative_prompt]").fill("a red background")
        form.locator("input[name=guidance]").fill("3")
        form.locator("input[name=strength]").fill("0.5")
        form.locator("input[name=style_scale]").fill("1.5")
        options = form.locator("select[name=scheduler] option").all_inner_texts()
        assert options == list(get_args(Scheduler))  # the UI offers every sampler the API takes
        form.locator("select[name=scheduler]").select_option("euler_a")
        form.locator("input[name=num_images]").fill("1")
        form.locator("button").click()
        expect(page.locator("#generated img[src^='blob:']")).to_have_count(1, timeout=scaled(120_000))
        api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['designer']}"})
        latest = api.get("/generations", params={"limit": 1}).json()["items"][0]
        asked = ("negative_prompt", "guidance", "strength", "content_scale", "style_scale", "scheduler")
        assert tuple(latest[k] for k in asked) == ("a red background", 3.0, 0.5, 1.0, 1.5, "euler_a")

        # the open fusion's adapter in every format, and a content's from its header
        for fmt, key in (("b4m", ".A"), ("diffusers", ".lora_A.weight"), ("kohya", ".lora_down.weight")):
            with page.expect_download() as dl:
                page.locator(f"#fusion-actions button.download-{fmt}").click()
            with safe_open(dl.value.path(), "np") as f:
                assert any(k.endswith(key) for k in f.keys()), (fmt, list(f.keys())[:3])
            assert dl.value.suggested_filename.endswith(".safetensors")
        header = page.locator("#matrix th[data-asset-id]", has_text=CONTENTS[0])
        with page.expect_download() as dl:
            header.locator("button.download-kohya").click()
        with safe_open(dl.value.path(), "np") as f:
            assert f.metadata()["ss_network_module"]

        # delete a fusion (its cell empties), fuse it again with many steps and cancel that job
        # from the list; the canceled cell offers to delete it and fuse again
        page.on("dialog", lambda d: d.accept())  # the confirm() of every delete
        page.locator("#fusion-actions button.delete").click()
        expect(page.locator("#samples")).to_be_hidden()
        cell = page.locator(f"td[data-content='{CONTENTS[0]}'][data-style='{STYLES[1]}']")
        expect(cell).to_have_class(re.compile("empty"))
        page.fill("#fusion-steps", "5000")
        cell.click()
        running = page.locator("#jobs li:not([data-status=succeeded]) .job-actions:visible button.cancel")
        expect(running).to_have_count(1, timeout=scaled(60_000))
        running.click()
        expect(cell).to_contain_text("canceled", timeout=scaled(120_000))
        page.fill("#fusion-steps", "5")
        cell.click()  # confirm: delete and fuse again
        expect(cell.locator("img[src^='blob:']")).to_have_count(1, timeout=scaled(300_000))

        # delete a style: its column goes, with its fusions
        page.locator("#matrix th[data-asset-id]", has_text=STYLES[1]).locator("button.delete").click()
        expect(page.locator("#matrix td.cell")).to_have_count(2)
        assert api.get("/styles").json()["total"] == 1
        assert api.get("/fusions").json()["total"] == 2
        assert not errors, errors
        browser.close()
