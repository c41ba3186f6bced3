"""The client: one method per API operation, typed with the API's own schemas."""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import httpx

from b4m_contract.jobs import TERMINAL, JobStatus
from b4m_contract.schemas import (
    Accepted,
    AssetList,
    AssetOut,
    BaseModelList,
    BaseModelOut,
    FusionList,
    FusionOut,
    GenerateDone,
    GenerationList,
    GenerationOut,
    JobList,
    JobOut,
)
from b4m_contract.signing import sign

DEFAULT_URL = "http://127.0.0.1:8000"
ImageInput = str | os.PathLike | bytes


class B4MError(Exception):
    """The server answered with an error (4xx/5xx): `status` and its `detail`."""

    def __init__(self, status: int, detail, method: str = "", path: str = ""):
        self.status, self.detail = status, detail
        super().__init__(f"{method} {path}: {status}: {detail}".strip())


class JobFailed(Exception):
    """`wait(..., check=True)` on a job that failed or was canceled."""

    def __init__(self, job: JobOut):
        self.job = job
        super().__init__(f"job {job.id} {job.status}: {job.error or ''}".strip())


class Client:
    """`url` and `api_key` default to the environment: `B4M_URL` (else http://127.0.0.1:8000)
    and `B4M_API_KEY` (none: a server with auth off)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = (url or os.environ.get("B4M_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("B4M_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport, follow_redirects=True
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise B4MError(r.status_code, detail, method, path)
        return r

    @staticmethod
    def _idem(key: str | None) -> dict:
        return {"Idempotency-Key": key} if key else {}

    # ------------------------------------------------------------------ assets
    def _add_asset(
        self,
        kind: str,
        images: Sequence[ImageInput],
        word: str,
        name: str,
        steps: int | None,
        learning_rate: float | None,
        token: str | None,
        base_model: str | None,
        aux_asset_ids: Sequence[str],
        webhook_url: str | None,
        idempotency_key: str | None,
        captions: Sequence[str] = (),
        aux_sets: int | None = None,
        preview_prompts: Sequence[str] = (),
        webhook_events: Sequence[str] = (),
    ) -> Accepted:
        files = []
        for i, im in enumerate(images):
            if isinstance(im, bytes):
                files.append(("images", (f"{i}.png", im, "application/octet-stream")))
            else:
                p = Path(im)
                files.append(("images", (p.name, p.read_bytes(), "application/octet-stream")))
        data: dict = {"class_word" if kind == "content" else "style_word": word, "name": name}
        for field, value in (
            ("steps", steps),
            ("learning_rate", learning_rate),
            ("token", token),
            ("base_model", base_model),
            ("webhook_url", webhook_url),
            ("aux_sets", aux_sets),
        ):
            if value is not None:
                data[field] = str(value)
        if aux_asset_ids:
            data["aux_asset_ids"] = list(aux_asset_ids)
        if captions:
            data["captions"] = list(captions)
        if preview_prompts:
            data["preview_prompts"] = list(preview_prompts)
        if webhook_events:
            data["webhook_events"] = list(webhook_events)
        r = self._request("POST", f"/{kind}s", files=files, data=data, headers=self._idem(idempotency_key))
        return Accepted.model_validate(r.json())

    def add_content(
        self,
        images: Sequence[ImageInput],
        class_word: str,
        name: str,
        *,
        steps: int | None = None,
        learning_rate: float | None = None,
        token: str | None = None,
        base_model: str | None = None,
        aux_asset_ids: Sequence[str] = (),
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        captions: Sequence[str] = (),
        aux_sets: int | None = None,
        preview_prompts: Sequence[str] = (),
        webhook_events: Sequence[str] = (),
    ) -> Accepted:
        """Upload a content's reference images (paths or bytes) and start its break-stage training.

        `captions`: one per image ("" for none), `{content}` where the new concept goes.
        `aux_sets`: MCP auxiliary sets from the base model's bank when no `aux_asset_ids` (0: none).
        `preview_prompts`: what the training previews draw (`{content}` for the concept)."""
        return self._add_asset(
            "content",
            images,
            class_word,
            name,
            steps,
            learning_rate,
            token,
            base_model,
            aux_asset_ids,
            webhook_url,
            idempotency_key,
            captions,
            aux_sets,
            preview_prompts,
            webhook_events,
        )

    def add_style(
        self,
        images: Sequence[ImageInput],
        style_word: str,
        name: str,
        *,
        steps: int | None = None,
        learning_rate: float | None = None,
        token: str | None = None,
        base_model: str | None = None,
        aux_asset_ids: Sequence[str] = (),
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        captions: Sequence[str] = (),
        aux_sets: int | None = None,
        preview_prompts: Sequence[str] = (),
        webhook_events: Sequence[str] = (),
    ) -> Accepted:
        """Upload a style's reference images and start its break-stage training (`captions` as for contents)."""
        return self._add_asset(
            "style",
            images,
            style_word,
            name,
            steps,
            learning_rate,
            token,
            base_model,
            aux_asset_ids,
            webhook_url,
            idempotency_key,
            captions,
            aux_sets,
            preview_prompts,
            webhook_events,
        )

    def contents(self, status: str | None = None, limit: int = 50, offset: int = 0) -> AssetList:
        return AssetList.model_validate(
            self._request("GET", "/contents", params=_params(status=status, limit=limit, offset=offset)).json()
        )

    def styles(self, status: str | None = None, limit: int = 50, offset: int = 0) -> AssetList:
        return AssetList.model_validate(
            self._request("GET", "/styles", params=_params(status=status, limit=limit, offset=offset)).json()
        )

    def content(self, content_id: str) -> AssetOut:
        return AssetOut.model_validate(self._request("GET", f"/contents/{content_id}").json())

    def style(self, style_id: str) -> AssetOut:
        return AssetOut.model_validate(self._request("GET", f"/styles/{style_id}").json())

    def reference_image(self, kind: Literal["content", "style"], asset_id: str, index: int = 0) -> bytes:
        return self._request("GET", f"/{kind}s/{asset_id}/images/{index}").content

    def delete_content(self, content_id: str, force: bool = False) -> None:
        self._request("DELETE", f"/contents/{content_id}", params={"force": str(force).lower()})

    def delete_style(self, style_id: str, force: bool = False) -> None:
        self._request("DELETE", f"/styles/{style_id}", params={"force": str(force).lower()})

    def all_assets(self, kind: Literal["content", "style"], status: str | None = None) -> Iterator[AssetOut]:
        """Every asset of a kind, page by page."""
        offset = 0
        while True:
            page = (self.contents if kind == "content" else self.styles)(status=status, limit=500, offset=offset)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def resolve_asset(self, kind: Literal["content", "style"], id_or_name: str) -> AssetOut:
        """An asset by id, or else by name (the newest of that name)."""
        found = _unless_404(self.content if kind == "content" else self.style, id_or_name)
        if found is not None:
            return found
        for a in self.all_assets(kind):
            if a.name == id_or_name:
                return a
        raise B4MError(404, f"no {kind} with id or name {id_or_name!r}")

    # ------------------------------------------------------------------ fusions
    def fuse(
        self,
        content_id: str,
        style_id: str,
        steps: int = 50,
        method: Literal["b4m", "joint", "merge", "ziplora"] = "b4m",
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        learning_rate: float | None = None,
        seed: int | None = None,
        preview_prompts: Sequence[str] = (),
        webhook_events: Sequence[str] = (),
    ) -> Accepted:
        """Combine a content and a style into one fine-tuned adapter (the make stage);
        `preview_prompts`: what its previews draw (`{content}`, `{style}`)."""
        body = _params(
            content_id=content_id,
            style_id=style_id,
            steps=steps,
            method=method,
            webhook_url=webhook_url,
            learning_rate=learning_rate,
            seed=seed,
            preview_prompts=list(preview_prompts) or None,
            webhook_events=list(webhook_events) or None,
        )
        r = self._request("POST", "/fusions", json=body, headers=self._idem(idempotency_key))
        return Accepted.model_validate(r.json())

    def fusions(
        self,
        status: str | None = None,
        content_id: str | None = None,
        style_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> FusionList:
        return FusionList.model_validate(
            self._request(
                "GET",
                "/fusions",
                params=_params(status=status, content_id=content_id, style_id=style_id, limit=limit, offset=offset),
            ).json()
        )

    def fusion(self, fusion_id: str) -> FusionOut:
        return FusionOut.model_validate(self._request("GET", f"/fusions/{fusion_id}").json())

    def delete_fusion(self, fusion_id: str) -> None:
        self._request("DELETE", f"/fusions/{fusion_id}")

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str,
        *,
        fusion_id: str | None = None,
        content_id: str | None = None,
        style_id: str | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        steps: int = 20,
        guidance: float = 5.0,
        strength: float = 1.0,
        content_scale: float = 1.0,
        style_scale: float = 1.0,
        scheduler: str = "default",
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        wait: float = 0.0,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        webhook_events: Sequence[str] = (),
    ) -> GenerateDone | Accepted:
        """Draw images; with `wait` the answer carries the image URLs if the job ends in time."""
        body = _params(
            prompt=prompt,
            fusion_id=fusion_id,
            content_id=content_id,
            style_id=style_id,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            strength=strength,
            content_scale=content_scale,
            style_scale=style_scale,
            scheduler=scheduler,
            width=width,
            height=height,
            num_images=num_images,
            wait=wait,
            webhook_url=webhook_url,
            webhook_events=list(webhook_events) or None,
        )
        r = self._request(
            "POST",
            "/generate",
            json=body,
            headers=self._idem(idempotency_key),
            timeout=self._http.timeout.read + wait if self._http.timeout.read else None,
        )
        return (GenerateDone if r.status_code == 200 else Accepted).model_validate(r.json())

    def generation(self, generation_id: str) -> GenerationOut:
        return GenerationOut.model_validate(self._request("GET", f"/generations/{generation_id}").json())

    def generations(
        self, fusion_id: str | None = None, status: str | None = None, limit: int = 50, offset: int = 0
    ) -> GenerationList:
        return GenerationList.model_validate(
            self._request(
                "GET", "/generations", params=_params(fusion_id=fusion_id, status=status, limit=limit, offset=offset)
            ).json()
        )

    def image(self, generation_id: str, index: int = 0) -> bytes:
        """One generated image as PNG bytes (follows the presigned redirect of an S3 store)."""
        return self._request("GET", f"/generations/{generation_id}/images/{index}").content

    # ------------------------------------------------------------------ adapters
    def download_adapter(
        self,
        adapter_id: str,
        format: Literal["b4m", "diffusers", "kohya"] = "b4m",
        dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
    ) -> bytes:
        params = {"format": format, "dtype": dtype}
        return self._request("GET", f"/adapters/{adapter_id}/download", params=params).content

    def adapter_card(self, adapter_id: str) -> str:
        """The adapter's model card (markdown)."""
        return self._request("GET", f"/adapters/{adapter_id}/card").text

    def resolve_adapter(self, any_id: str) -> str:
        """The adapter id behind a fusion, content or style id, or a content or style name
        (else `any_id` itself: an adapter id)."""
        lookups = [
            (self.fusion, any_id),
            (self.content, any_id),
            (self.style, any_id),
            (self.resolve_asset, "content", any_id),
            (self.resolve_asset, "style", any_id),
        ]
        for fn, *args in lookups:
            row = _unless_404(fn, *args)
            if row is None:
                continue
            if not row.adapter_id:
                raise B4MError(409, f"{any_id} has no adapter yet (its job is {row.status})")
            return row.adapter_id
        return any_id

    # ------------------------------------------------------------------ jobs
    def job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("GET", f"/jobs/{job_id}").json())

    def jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> JobList:
        return JobList.model_validate(
            self._request("GET", "/jobs", params=_params(status=status, limit=limit, offset=offset)).json()
        )

    def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/jobs/{job_id}/cancel").json())

    def retry(self, job_id: str) -> JobOut:
        """Queue a failed job again (a training resumes from its last checkpoint)."""
        return JobOut.model_validate(self._request("POST", f"/jobs/{job_id}/retry").json())

    def loss_curve(self, job_id: str) -> bytes:
        return self._request("GET", f"/jobs/{job_id}/loss.png").content

    def preview(self, job_id: str, index: int) -> bytes:
        return self._request("GET", f"/jobs/{job_id}/previews/{index}").content

    def events(self, job_id: str, interval: float = 0.5) -> Iterator[tuple[str, JobOut]]:
        """The job's Server-Sent Events as (event, job): `progress` while it changes, `end` last."""
        with self._http.stream(
            "GET",
            f"/jobs/{job_id}/events",
            params={"interval": interval},
            timeout=httpx.Timeout(self._http.timeout.connect, read=None),
        ) as r:
            if r.status_code >= 400:
                r.read()
                raise B4MError(r.status_code, r.json().get("detail", r.text), "GET", f"/jobs/{job_id}/events")
            event, data = "message", []
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, JobOut.model_validate(json.loads("\n".join(data)))
                    if event == "end":
                        return
                    event, data = "message", []

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[JobOut], None] | None = None,
        check: bool = True,
    ) -> JobOut:
        """Follow the job's events until it ends; `check` raises JobFailed unless it succeeded.
        A dropped stream is reopened; `timeout` raises TimeoutError."""
        deadline = time.monotonic() + timeout if timeout else None
        job = self.job(job_id)
        while job.status not in TERMINAL:
            try:
                for _, job in self.events(job_id):
                    if on_progress:
                        on_progress(job)
                    if deadline and time.monotonic() > deadline:
                        break
            except httpx.TransportError:
                time.sleep(1.0)
                job = self.job(job_id)
            if deadline and time.monotonic() > deadline and job.status not in TERMINAL:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
        if check and job.status != JobStatus.SUCCEEDED:
            raise JobFailed(job)
        return job

    # ------------------------------------------------------------------ account and ops
    def webhook_secret(self) -> str:
        """This tenant's webhook signing secret (`whsec_...`), for `verify_webhook`."""
        return self._request("GET", "/webhooks/secret").json()["secret"]

    def base_models(self) -> list[BaseModelOut]:
        """The base models uploads may name, with the training defaults a run on each gets."""
        return BaseModelList.model_validate(self._request("GET", "/base-models").json()).items

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()

    def ready(self) -> dict:
        r = self._http.get("/readyz")
        return r.json()


def _unless_404(fn, *args):
    """fn(*args), or None when the server answers 404."""
    try:
        return fn(*args)
    except B4MError as exc:
        if exc.status != 404:
            raise
        return None


def _params(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def verify_webhook(secret: str, headers, body: bytes, tolerance_s: float = 300.0) -> dict:
    """Check a webhook's signature (Standard Webhooks: `webhook-id`, `webhook-timestamp`,
    `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`) and return its JSON.
    Raises ValueError when it is not from the server or is too old (a replay)."""
    h = {k.lower(): v for k, v in dict(headers).items()}
    msg_id, ts, sigs = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature", "")
    if not msg_id or not ts:
        raise ValueError("missing webhook-id or webhook-timestamp")
    if abs(time.time() - int(ts)) > tolerance_s:
        raise ValueError("timestamp outside the tolerance (replayed?)")
    expected = sign(secret, msg_id, int(ts), body)
    for sig in sigs.split():
        if hmac.compare_digest(sig, expected):
            return json.loads(body)
    raise ValueError("bad signature")
