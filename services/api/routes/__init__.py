"""The API's routes, one module per resource; `ROUTERS` is what `create_app` includes."""

from . import adapters, assets, fusions, generations, jobs, system

ROUTERS = [assets.router, fusions.router, generations.router, jobs.router, adapters.router, system.router]
