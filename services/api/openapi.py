"""The OpenAPI document's shared parts: error responses and descriptions of recurring names."""

from __future__ import annotations

from b4m_contract.schemas import ErrorOut, WebhookEvent


def errors(*codes: int) -> dict:
    """OpenAPI `responses` entries for the error codes a route can answer."""
    text = {
        400: "bad request",
        401: "missing or invalid API key",
        404: "not found (or another tenant's)",
        409: "conflict: Idempotency-Key reused with another body, or the resource is in use",
        413: "upload too large (bytes or pixels)",
        422: "invalid input: the message says which field and why",
        503: "a dependency is down",
    }
    return {c: {"model": ErrorOut, "description": text[c]} for c in codes}


# Descriptions for fields and parameters that recur under one name across the API; the
# OpenAPI document gets them wherever a route or schema left the name undescribed.
COMMON_DOCS = {
    "id": "this resource's id",
    "kind": "content or style",
    "name": "a display name",
    "created_at": "ISO 8601, UTC",
    "started_at": "ISO 8601, UTC; when a worker first started the job",
    "finished_at": "ISO 8601, UTC; when the job ended",
    "items": "this page's rows, newest first",
    "total": "matching rows before paging",
    "limit": "page size (1 to 500)",
    "offset": "rows to skip",
    "content_id": "a content asset's id",
    "style_id": "a style asset's id",
    "fusion_id": "a fusion's id",
    "asset_id": "the asset's id",
    "generation_id": "the generation's id",
    "adapter_id": "the adapter's id",
    "job_id": "the job's id",
    "index": "which image of the generation (0-based)",
    "steps": "steps (training: optimisation steps; generation: sampling steps)",
    "method": "b4m, joint, merge or ziplora",
    "status": "queued, running, succeeded, failed or canceled",
    "class_word": "the content's class word, e.g. 'dog' or 'shape'",
    "style_word": "the style's word, e.g. 'watercolor' or 'pattern'",
    "base_model": "base model: a diffusers folder, a hub id, or 'micro' (default: B4M_BASE_MODEL)",
    "token": "identifier token for {content}/{style} (default sks for contents, zwx for styles)",
    "aux_asset_ids": "repeated: assets of the other kind whose images are the MCP auxiliary sets",
    "prompt": "the prompt, with {content} / {style} placeholders",
    "negative_prompt": "what to steer away from",
    "seed": "image i uses seed + i",
    "guidance": "classifier-free guidance scale",
    "width": "pixels",
    "height": "pixels",
    "num_images": "how many images (1 to 8)",
}


def describe_openapi(spec: dict) -> dict:
    """Fill in COMMON_DOCS where a schema property or a parameter has no description."""
    for schema in spec.get("components", {}).get("schemas", {}).values():
        for name, prop in schema.get("properties", {}).items():
            if not prop.get("description") and name in COMMON_DOCS:
                prop["description"] = COMMON_DOCS[name]
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            for p in op.get("parameters", []):
                if not p.get("description") and p["name"] in COMMON_DOCS:
                    p["description"] = COMMON_DOCS[p["name"]]
    return spec


def document_webhooks(app) -> None:
    """The events a job's `webhook_url` receives, in the document's `webhooks` section."""

    @app.webhooks.post("job-ended", operation_id="job_ended")
    def job_ended(event: WebhookEvent) -> None:
        """POSTed to a job's `webhook_url` when it ends (`type`: job.succeeded, job.failed or
        job.canceled) and, when its `webhook_events` name `started`, when it starts (job.started);
        at least once, retried with exponential backoff and jitter until the receiver answers 2xx.
        Signed as Standard Webhooks: headers `webhook-id` (one per event: dedupe on it),
        `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`
        with the tenant's secret from `GET /webhooks/secret`)."""
