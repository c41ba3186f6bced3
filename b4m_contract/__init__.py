"""What the B4M service and its clients agree on: request and response bodies, job statuses
and types, the webhook signature. Depends on pydantic only, so the client installs without
the server and the server without the client."""
