"""`b4m`: the library's commands plus the service's (`serve`, `worker`).

The service commands live here, not in b4m_core, which knows nothing of HTTP or queues.
"""

from __future__ import annotations

import sys

from b4m_core.cli import main as core_main


def _add(sub) -> None:
    p = sub.add_parser("serve", help="run the API; with no B4M_BROKER_URL it also runs the jobs in-process")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("worker", help="run a Celery worker (one per GPU) on B4M_BROKER_URL")
    p.add_argument("--queues", default="training,generation")
    p = sub.add_parser("reconcile", help="re-send jobs whose queue message was lost, queue again jobs whose worker "
                                         "died, end jobs past their deadline (the API also does this itself)")
    p.add_argument("--once", action="store_true", help="one sweep, print what it did, exit")
    p = sub.add_parser("tenant", help="manage tenants in the database of B4M_DATABASE_URL (or the embedded one)")
    tsub = p.add_subparsers(dest="action", required=True)
    tsub.add_parser("create", help="add a tenant").add_argument("name")
    tsub.add_parser("list", help="tenants and their keys (prefixes only)")
    p = sub.add_parser("key", help="manage API keys (stored hashed; a new key is printed once)")
    ksub = p.add_subparsers(dest="action", required=True)
    ksub.add_parser("create", help="a new key for a tenant").add_argument("tenant", help="tenant name or id")
    ksub.add_parser("revoke", help="revoke a key").add_argument("key", help="key id or prefix")


def cmd_serve(args) -> None:
    import uvicorn

    from services.common.observability import setup_logging
    from services.common.settings import get_settings

    setup_logging(json_logs=get_settings().log_json)  # uvicorn's loggers propagate to it
    uvicorn.run("services.api.app:create_app", factory=True, host=args.host, port=args.port, log_level="info",
                log_config=None)


def cmd_worker(args) -> None:
    from services.worker.celery_app import app

    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", args.queues, "-l", "info"])


def cmd_reconcile(args) -> None:
    import json
    import threading

    from services.api.queue import CeleryQueue
    from services.common.reconciler import Reconciler
    from services.common.settings import get_settings

    settings = get_settings()
    if not settings.broker_url:
        from b4m_core.config import ConfigError

        raise ConfigError("b4m reconcile needs B4M_BROKER_URL; the embedded API reconciles its own queue")
    queue = CeleryQueue(settings)
    rec = Reconciler(_sessions(), settings, queue.enqueue, queue.waiting_ids, store=settings.object_store())
    if args.once:
        print(json.dumps(rec.sweep()))
    else:
        rec.run_forever(threading.Event())


def _sessions():
    from services.common.db import make_engine, migrate, session_factory
    from services.common.settings import get_settings

    url = get_settings().resolved_database_url
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
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
            print(json.dumps({"id": row.id, "tenant_id": row.tenant_id, "key": key,
                              "note": "shown once: only its sha256 is stored"}))
        else:
            row = tenants.revoke_key(_sessions(), args.key)
            print(json.dumps({"id": row.id, "revoked_at": row.revoked_at.isoformat()}))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    return core_main(argv, extensions=(_add,), commands={"serve": cmd_serve, "worker": cmd_worker,
                                                         "tenant": cmd_tenant, "key": cmd_key, "reconcile": cmd_reconcile})


if __name__ == "__main__":
    sys.exit(main())
