"""`b4m`: the library's commands plus the service's (`serve`, `worker`).

The service commands live here, not in b4m_core, which knows nothing of HTTP or queues.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from b4m_contract.jobs import JobStatus
from b4m_core.cli import cmd_demo as core_demo
from b4m_core.cli import cmd_export as core_export
from b4m_core.cli import cmd_fuse as core_fuse
from b4m_core.cli import cmd_generate as core_generate
from b4m_core.cli import main as core_main


def _add(sub) -> None:
    p = sub.add_parser("serve", help="run the API; with no B4M_BROKER_URL it also runs the jobs in-process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("worker", help="run a Celery worker (one per GPU) on B4M_BROKER_URL")
    p.add_argument("--queues", default="training,generation")
    p = sub.add_parser(
        "reconcile",
        help="re-send jobs whose queue message was lost, queue again jobs whose worker "
        "died, end jobs past their deadline (the API also does this itself)",
    )
    p.add_argument("--once", action="store_true", help="one sweep, print what it did, exit")
    p = sub.add_parser("tenant", help="manage tenants in the database of B4M_DATABASE_URL (or the embedded one)")
    tsub = p.add_subparsers(dest="action", required=True)
    tsub.add_parser("create", help="add a tenant").add_argument("name")
    tsub.add_parser("list", help="tenants and their keys (prefixes only)")
    tsub.add_parser(
        "bootstrap", help="with no tenant at all: make a first one and a key, printed once (else nothing)"
    ).add_argument("name", nargs="?", default="default")
    p = sub.add_parser("key", help="manage API keys (stored hashed; a new key is printed once)")
    ksub = p.add_subparsers(dest="action", required=True)
    ksub.add_parser("create", help="a new key for a tenant").add_argument("tenant", help="tenant name or id")
    ksub.add_parser("revoke", help="revoke a key").add_argument("key", help="key id or prefix")


def _server_flags(p) -> None:
    p.add_argument("--url", default=None, help="the server (default: env B4M_URL, else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: env B4M_API_KEY)")


def _add_server(sub) -> None:
    """The commands that talk to a running server through the typed client."""
    for kind, word in (("content", "class word, e.g. dog or shape"), ("style", "style word, e.g. watercolor")):
        p = sub.add_parser(kind, help=f"{kind}s on a server: add (upload + train), list, show")
        ksub = p.add_subparsers(dest="action", required=True)
        a = ksub.add_parser("add", help=f"upload a {kind}'s reference images and train it (the break stage)")
        a.add_argument(
            "images",
            nargs="*",
            help="1 to 10 images: files or folders (PNG, JPEG, WebP); a same-stem .txt beside one is its caption",
        )
        a.add_argument(
            "--images", dest="image_flags", nargs="+", default=[], help="the images, as `b4m train` takes them"
        )
        a.add_argument(
            "--word", "--class-word" if kind == "content" else "--style-word", dest="word", required=True, help=word
        )
        a.add_argument("--name", required=True, help="a display name (fuse and export accept it in place of the id)")
        a.add_argument("--token", default=None, help="identifier token (default sks / zwx)")
        a.add_argument("--steps", type=int, default=None, help="training steps (default: the base model's)")
        a.add_argument("--lr", type=float, default=None, help="learning rate (default: the base model's)")
        a.add_argument("--base-model", default=None, help="base model (default: the server's)")
        a.add_argument("--aux", action="append", default=[], help="an asset of the other kind for MCP (repeatable)")
        a.add_argument(
            "--aux-sets",
            type=int,
            default=None,
            metavar="K",
            help="with no --aux: K MCP sets from the base model's bank (default: the model's, 3 on micro; 0: none)",
        )
        a.add_argument(
            "--sample-prompt",
            action="append",
            default=[],
            metavar="PROMPT",
            help="what the server's training previews draw ({content} / {style}: the concept; repeatable, at most 4)",
        )
        a.add_argument("--webhook", default=None, help="URL the server POSTs a signed event to when training ends")
        a.add_argument("--idempotency-key", default=None, help="retrying with the same key never trains twice")
        a.add_argument("--watch", action="store_true", help="show a progress bar until the training ends")
        _server_flags(a)
        ls = ksub.add_parser("list", help=f"the {kind}s, newest first")
        ls.add_argument("--status", default=None, choices=list(JobStatus))
        ls.add_argument("--json", action="store_true", help="JSON instead of a table")
        _server_flags(ls)
        sh = ksub.add_parser("show", help=f"one {kind} (by id or name) as JSON")
        sh.add_argument("id")
        _server_flags(sh)
    p = sub.add_parser("jobs", help="jobs on a server: watch (live progress bar), list, show, cancel, retry")
    jsub = p.add_subparsers(dest="action", required=True)
    w = jsub.add_parser(
        "watch", help="a progress bar from the job's live events until it ends (exit 1 unless it succeeded)"
    )
    w.add_argument("job_id")
    _server_flags(w)
    ls = jsub.add_parser("list", help="jobs, newest first")
    ls.add_argument("--status", default=None, choices=list(JobStatus))
    ls.add_argument("--json", action="store_true")
    _server_flags(ls)
    for name, text in (
        ("show", "one job as JSON"),
        ("cancel", "cancel a job"),
        ("retry", "queue a failed job again (a training resumes from its last checkpoint)"),
    ):
        x = jsub.add_parser(name, help=text)
        x.add_argument("job_id")
        _server_flags(x)
    p = sub.add_parser("base-models", help="the base models a server's uploads may name, with their defaults")
    p.add_argument("--json", action="store_true")
    _server_flags(p)


def _amend(parsers: dict) -> None:
    """Server forms of fuse, generate and export, beside their local-file forms."""
    p = parsers["fuse"]
    p.description = (
        "local: b4m fuse --content FILE --style FILE --content-images DIR --style-images DIR --out FILE; "
        "server: b4m fuse CONTENT STYLE (ids or names) [--steps N] [--watch]"
    )
    p.add_argument("content_ref", nargs="?", metavar="CONTENT", help="server form: a content's id or name")
    p.add_argument("style_ref", nargs="?", metavar="STYLE", help="server form: a style's id or name")
    p.add_argument("--watch", action="store_true", help="server form: progress bar until the fusion ends")
    p.add_argument("--webhook", default=None, help="server form: URL to POST a signed event to when it ends")
    _server_flags(p)
    for action in p._actions:  # --out names a local file: the server form keeps the adapter on the server
        if action.dest == "out":
            action.required, action.default = False, None
    p = parsers["generate"]
    p.add_argument("--fusion", default=None, help="server form: draw with this fusion")
    p.add_argument("--content-id", default=None, help="server form: draw with this content alone")
    p.add_argument("--style-id", default=None, help="server form: draw with this style alone")
    p.add_argument("--timeout", type=float, default=600, help="server form: seconds to wait for the images")
    _server_flags(p)
    p = parsers["demo"]
    p.add_argument(
        "--url",
        default=None,
        help="run the demo on this server through the API (the client), instead of in this process",
    )
    p.add_argument("--api-key", default=None, help="API key for --url (default: env B4M_API_KEY)")
    p = parsers["export"]
    p.add_argument(
        "ref",
        nargs="?",
        metavar="ID",
        help="server form: an adapter, fusion, content or style id (or a content/style name)",
    )
    _server_flags(p)


def _client(args):
    from b4m_client import Client

    return Client(args.url, api_key=args.api_key)


def _watch(client, job_id: str) -> int:
    """A tqdm bar fed by the job's Server-Sent Events; 0 when the job succeeded."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", dynamic_ncols=True, file=sys.stderr)
    seen_previews = 0

    def update(job) -> None:
        nonlocal seen_previews
        if job.progress_total and bar.total != job.progress_total:
            bar.reset(total=job.progress_total)
        bar.n = job.progress_step
        bar.set_description(f"{job.type} {job.status}")
        post = {}
        if job.loss is not None:
            post["loss"] = f"{job.loss:.4f}"
        if job.eta_seconds:
            post["eta"] = f"{job.eta_seconds:.0f}s"
        if job.attempts > 1:
            post["attempt"] = job.attempts
        bar.set_postfix(post, refresh=False)
        bar.refresh()
        for url in job.previews[seen_previews:]:
            bar.write(f"preview: {client.url}{url}")
        seen_previews = len(job.previews)

    job = client.wait(job_id, on_progress=update, check=False)
    update(job)
    bar.close()
    summary = {"id": job.id, "status": job.status, **job.outputs}
    if job.error:
        summary["error"] = job.error
    if "loss_curve" in summary:
        summary["loss_curve"] = client.url + summary["loss_curve"]
    print(json.dumps(summary))
    return 0 if job.status == JobStatus.SUCCEEDED else 1


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max([len(c)] + [len(str(r.get(c) or "")) for r in rows]) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c) or "").ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


# exit codes: 0 done, 1 the job failed, 2 bad usage or input, 3 not found, 4 server unreachable
EXIT_NOT_FOUND, EXIT_UNREACHABLE = 3, 4


def _server_errors(fn):
    """Server answers and connection failures as one-line errors (exit 2), not tracebacks."""

    def run(args):
        import httpx

        from b4m_client import B4MError
        from b4m_core.config import ConfigError

        try:
            code = fn(args)
        except B4MError as exc:
            if exc.status == 404:  # its own exit code: a script can tell "no such thing" from a usage error
                print(f"b4m: not found: {exc.detail}", file=sys.stderr)
                raise SystemExit(EXIT_NOT_FOUND) from exc
            raise ConfigError(f"server said {exc.status}: {exc.detail}") from exc
        except httpx.TransportError as exc:
            url = getattr(args, "url", None) or os.environ.get("B4M_URL") or "http://127.0.0.1:8000"
            print(
                f"b4m: cannot reach the server at {url} ({exc}): start one with `b4m serve`, "
                "or point --url (or B4M_URL) at yours",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_UNREACHABLE) from exc
        if code:
            raise SystemExit(code)

    return run


def _sidecar_captions(images) -> list[str]:
    """Same-stem .txt captions beside the image files, as `b4m train` reads them; [] when none."""
    sidecars = [Path(im).with_suffix(".txt") for im in images]
    found = [p.read_text().strip() if p.is_file() else "" for p in sidecars]
    return found if any(found) else []


@_server_errors
def cmd_asset(args):
    kind = args.command
    with _client(args) as c:
        if args.action == "add":
            from b4m_core.config import ConfigError
            from b4m_core.files import image_files

            if not (args.images or args.image_flags):
                raise ConfigError(f"b4m {kind} add: give the images (files or folders)")
            images = image_files(args.images + args.image_flags)
            add = c.add_content if kind == "content" else c.add_style
            r = add(
                images,
                args.word,
                args.name,
                steps=args.steps,
                learning_rate=args.lr,
                token=args.token,
                base_model=args.base_model,
                aux_asset_ids=[c.resolve_asset("style" if kind == "content" else "content", a).id for a in args.aux],
                webhook_url=args.webhook,
                idempotency_key=args.idempotency_key,
                captions=_sidecar_captions(images),
                aux_sets=args.aux_sets,
                preview_prompts=args.sample_prompt,
            )
            print(r.model_dump_json())
            return _watch(c, r.job_id) if args.watch else 0
        if args.action == "show":
            print(c.resolve_asset(kind, args.id).model_dump_json(indent=2))
            return 0
        rows = [a.model_dump() for a in c.all_assets(kind, status=args.status)]
        print(
            json.dumps(rows, indent=2)
            if args.json
            else _table(rows, ["id", "name", "word", "token", "status", "adapter_id", "images"])
        )
        return 0


@_server_errors
def cmd_base_models(args):
    with _client(args) as c:
        models = c.base_models()
    if args.json:
        print(json.dumps([m.model_dump() for m in models], indent=2))
        return 0
    rows = [
        {"name": m.name + (" (default)" if m.default else ""), "arch": m.arch or "?", "source": m.source}
        | {k: m.defaults.get(k, "") for k in ("rank", "break_steps", "learning_rate", "mixed_precision")}
        for m in models
    ]
    print(_table(rows, ["name", "arch", "rank", "break_steps", "learning_rate", "mixed_precision", "source"]))
    return 0


@_server_errors
def cmd_jobs(args):
    with _client(args) as c:
        if args.action == "watch":
            return _watch(c, args.job_id)
        if args.action == "show":
            print(c.job(args.job_id).model_dump_json(indent=2))
        elif args.action == "cancel":
            print(c.cancel(args.job_id).model_dump_json())
        elif args.action == "retry":
            print(c.retry(args.job_id).model_dump_json())
        else:
            rows = [j.model_dump() for j in c.jobs(status=args.status, limit=500).items]
            print(
                json.dumps(rows, indent=2)
                if args.json
                else _table(rows, ["id", "type", "status", "progress_step", "progress_total", "attempts", "error"])
            )
        return 0


def cmd_fuse(args) -> None:
    if not (args.content_ref or args.style_ref):
        from b4m_core.cli import require

        require(args, "--out")
        return core_fuse(args)
    return _server_fuse(args)


@_server_errors
def _server_fuse(args):
    from b4m_core.config import ConfigError

    if not (args.content_ref and args.style_ref):
        raise ConfigError("b4m fuse CONTENT STYLE: give both (ids or names)")
    with _client(args) as c:
        content, style = c.resolve_asset("content", args.content_ref), c.resolve_asset("style", args.style_ref)
        r = c.fuse(
            content.id,
            style.id,
            steps=50 if args.steps is None else args.steps,
            method=args.method,
            webhook_url=args.webhook,
            learning_rate=args.lr,
            seed=args.seed,
            preview_prompts=getattr(args, "sample_prompt", []),
        )
        print(r.model_dump_json())
        return _watch(c, r.job_id) if args.watch else 0


def cmd_generate(args) -> None:
    server = args.fusion or args.content_id or args.style_id or args.url
    if server or (os.environ.get("B4M_URL") and not args.adapter):  # B4M_URL names a server too
        return _server_generate(args)
    return core_generate(args)


@_server_errors
def _server_generate(args):
    from pathlib import Path

    with _client(args) as c:
        r = c.generate(
            args.prompt,
            fusion_id=args.fusion,
            content_id=args.content_id,
            style_id=args.style_id,
            negative_prompt=args.negative_prompt,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            strength=args.strength,
            content_scale=args.content_scale,
            style_scale=args.style_scale,
            scheduler=args.scheduler,
            width=args.width,
            height=args.height,
            num_images=args.num_images,
        )
        c.wait(r.job_id, timeout=args.timeout)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for i in range(args.num_images):
            path = out / f"image_{args.seed}_{i:02d}.png"
            path.write_bytes(c.image(r.id, i))
            print(path)
        return 0


def cmd_demo(args) -> None:
    if not args.url:
        return core_demo(args)
    return _server_demo(args)


@_server_errors
def _server_demo(args):
    from pathlib import Path

    from b4m_core.micro.world import HELDOUT_CONTENTS, HELDOUT_STYLES
    from services.main_job import run_on, save_grid

    n = 2 if args.quick else None
    contents, styles = (
        list(HELDOUT_CONTENTS[:n] if n else HELDOUT_CONTENTS),
        list(HELDOUT_STYLES[:n] if n else HELDOUT_STYLES),
    )
    with _client(args) as c:
        cells = run_on(
            c,
            Path(args.out),
            contents,
            styles,
            args.break_steps or (80 if args.quick else 200),
            args.make_steps or (20 if args.quick else 50),
        )
    print(save_grid(Path(args.out), cells, contents, styles))
    return 0


def cmd_export(args) -> None:
    if args.ref:
        return _server_export(args)
    return core_export(args)


@_server_errors
def _server_export(args):
    from b4m_core.formats import write_export

    with _client(args) as c:  # ours, converted here: the model card reads our metadata
        data = c.download_adapter(c.resolve_adapter(args.ref), "b4m")
        samples = None
        if args.format == "diffusers" and not Path(args.out).suffix and args.samples:
            samples = _server_samples(c, args.ref, data, args.samples)
    print("\n".join(str(p) for p in write_export(data, args.format, Path(args.out), args.dtype, samples=samples)))
    return 0


def _server_samples(c, ref: str, adapter: bytes, n: int) -> bytes | None:
    """`n` images the server draws with the fusion, content or style `ref` names, with the
    adapter's usage prompt, as one PNG (None when `ref` is a bare adapter id)."""
    from b4m_client import B4MError
    from b4m_core.formats import read, sample_grid, usage_hint

    for field, lookup in (
        ("fusion_id", c.fusion),
        ("content_id", lambda r: c.resolve_asset("content", r)),
        ("style_id", lambda r: c.resolve_asset("style", r)),
    ):
        try:
            target = lookup(ref).id
        except B4MError as exc:
            if exc.status != 404:
                raise
            continue
        r = c.generate(usage_hint(read(adapter)[1]), num_images=n, wait=300, **{field: target})
        c.wait(r.job_id)
        return sample_grid([c.image(r.id, i) for i in range(n)])
    return None


def graceful_server_class():
    """uvicorn's Server, ending the event streams, `wait`s and the embedded worker's job on
    the first SIGTERM/SIGINT."""
    import uvicorn

    from services.api.watch import shut_down_all
    from services.common.lifecycle import DRAINING

    class GracefulServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:
            # Only the first signal sets the events: a second one (the deploy's retry, a
            # shell's trap) can land while the first handler is inside Event.set, holding
            # that Event's lock, and setting it again from the handler deadlocked the
            # server for good (found by the README walk-through's test).
            if not self.draining:
                self.draining = True
                # uvicorn waits for open responses before it stops: end the event streams
                # and `wait`s now, so a rolling deploy is not held up by them
                shut_down_all()
                DRAINING.set()  # the embedded worker hands its job back at the next step
            super().handle_exit(sig, frame)

    return GracefulServer


def cmd_serve(args) -> None:
    import uvicorn

    from services.common.observability import setup_logging
    from services.common.settings import get_settings

    Server = graceful_server_class()
    setup_logging(json_logs=get_settings().log_json)  # uvicorn's loggers propagate to it
    config = uvicorn.Config(
        "services.embedded:create_server_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=None,
    )
    Server(config).run()


def cmd_worker(args) -> None:
    from services.worker.celery_app import app

    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", args.queues, "-l", "info"])


def cmd_reconcile(args) -> None:
    import json
    import threading

    from services.common.broker import CeleryQueue
    from services.common.reconciler import Reconciler
    from services.common.settings import get_settings

    settings = get_settings()
    if not settings.broker_url:
        from b4m_core.config import ConfigError

        raise ConfigError("b4m reconcile needs B4M_BROKER_URL; the embedded API reconciles its own queue")
    queue = CeleryQueue(settings)
    rec = Reconciler(_sessions(), settings, queue.enqueue, queue.waiting_ids, store=settings.object_store())
    if args.once:
        print(json.dumps(rec.sweep(orphans=True)))
    else:
        rec.run_forever(threading.Event())


def _sessions():
    from services.common.db import make_engine, migrate, session_factory
    from services.common.settings import get_settings

    url = get_settings().resolved_database_url
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    migrate(url)
    return session_factory(make_engine(url))


def cmd_tenant(args) -> None:
    import json

    from b4m_core.config import ConfigError
    from services.common import tenants

    try:
        if args.action == "create":
            t = tenants.create_tenant(_sessions(), args.name)
            print(json.dumps({"id": t.id, "name": t.name}))
        elif args.action == "bootstrap":
            made = tenants.bootstrap(_sessions(), args.name)
            if made is None:
                print(json.dumps({"bootstrap": "a tenant exists: nothing done"}))
            else:
                key, row = made
                note = "the first tenant's API key, shown once: send it as 'Authorization: Bearer <key>'"
                print(json.dumps({"tenant": args.name, "tenant_id": row.tenant_id, "key": key, "note": note}))
        else:
            print(json.dumps(tenants.list_tenants(_sessions()), indent=2))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def cmd_key(args) -> None:
    import json

    from b4m_core.config import ConfigError
    from services.common import tenants

    try:
        if args.action == "create":
            key, row = tenants.create_key(_sessions(), args.tenant)
            print(
                json.dumps(
                    {
                        "id": row.id,
                        "tenant_id": row.tenant_id,
                        "key": key,
                        "note": "shown once: only its sha256 is stored",
                    }
                )
            )
        else:
            row = tenants.revoke_key(_sessions(), args.key)
            print(json.dumps({"id": row.id, "revoked_at": row.revoked_at.isoformat()}))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    return core_main(
        argv,
        extensions=(_add, _add_server),
        amend=(_amend,),
        commands={
            "serve": cmd_serve,
            "worker": cmd_worker,
            "tenant": cmd_tenant,
            "key": cmd_key,
            "reconcile": cmd_reconcile,
            "content": cmd_asset,
            "style": cmd_asset,
            "jobs": cmd_jobs,
            "base-models": cmd_base_models,
            "fuse": cmd_fuse,
            "generate": cmd_generate,
            "export": cmd_export,
            "demo": cmd_demo,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
