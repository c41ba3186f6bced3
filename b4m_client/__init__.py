"""A typed Python client for the B4M service (the `b4m` server commands and the demo use it).

    from b4m_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as b4m:
        content = b4m.add_content(["a.png", "b.png"], class_word="dog", name="my dog")
        style = b4m.add_style(["s.png"], style_word="watercolor", name="wc")
        b4m.wait(content.job_id), b4m.wait(style.job_id)
        fusion = b4m.fuse(content.id, style.id)
        b4m.wait(fusion.job_id)
        done = b4m.generate("a {content} in {style} style", fusion_id=fusion.id, num_images=2, wait=60)
        png = b4m.image(done.id, 0)

Answers are the API's own pydantic models; errors are `B4MError` with the status code
and the server's message.
"""

from .client import B4MError, Client, JobFailed, verify_webhook

__all__ = ["B4MError", "Client", "JobFailed", "verify_webhook"]
