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


def cmd_serve(args) -> None:
    import uvicorn

    uvicorn.run("services.api.app:create_app", factory=True, host=args.host, port=args.port, log_level="info")


def cmd_worker(args) -> None:
    from services.worker.celery_app import app

    app.worker_main(["worker", "--pool=solo", "--concurrency=1", "-Q", args.queues, "-l", "info"])


def main(argv: list[str] | None = None) -> int:
    return core_main(argv, extensions=(_add,), commands={"serve": cmd_serve, "worker": cmd_worker})


if __name__ == "__main__":
    sys.exit(main())
