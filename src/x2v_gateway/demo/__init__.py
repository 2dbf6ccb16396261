"""A stand-in for a LightX2V self-hosted node: the same HTTP API, quirks included, tiny renders.

It reproduces what the self-hosted contract (selfhosted.md) captured from the real server
(ModelTC/LightX2V `lightx2v/server/`, commit f8aee98b): the routes and their trailing-slash
rules (FastAPI's 307 redirects and 405s), `task_status` on submit but `status` on the status
route, pydantic-shaped 422 bodies, a single FIFO processing thread, `max_queue_size` counting
pending + processing tasks, cancel that does not stop a running inference (the task flips from
`cancelled` to `completed`), at most 1000 tasks kept in memory and nothing else remembered
across a restart, while the files in `<data_dir>/outputs/` stay downloadable.

"Inference" is `video.render_video`: the input image slowly zooming, with the input audio for
s2v, or a prompt card when there is no image. A prompt containing `FAIL` makes inference fail
with a RuntimeError, like the stub the contract was captured with. `job_seconds` makes every
task take at least that long, for benchmarks.

Image tasks go to `/v1/tasks/image/` and `/v1/tasks/image/form` as on the real server (their own
fields, `aspect_ratio` and `i2i_denoise_strength`, the image form's optional `image_file`, and a
`<id>.png` output served as `image/png`); "inference" is `image.render_image`.

Not reproduced: the sync image route, the OpenAI routes (`/v1/images/...`) and SenseNova-Vision
are declared but answer 404 `{"detail":"Not Found"}`; `/docs` is a short HTML page rather than
Swagger UI, and there is no `/openapi.json`; there is no Prometheus metrics port.

Two additions that are not part of the upstream API, both for tests: every accepted submission
is appended to `<data_dir>/submissions.jsonl` (task_id, time, route, the request fields the
runner would get, and `held`: the tasks pending or running once it was accepted), so a test can count and inspect what reached the node across restarts; and
a write to a `save_result_path` outside `outputs/` is refused (the task still completes, as the
real stub did).

The package, by idea: `node` (the app: routes, handlers, processing thread, server), `board`
(the tasks in memory), `validate` (pydantic-shaped 422s), `inputs` (base64 and URL inputs),
`video` and `image` (the renderers), and `asgi`, the small ASGI toolkit the tests' doubles use too.

Run one:

    python -m x2v_gateway.demo --host 127.0.0.1 --port 8000 --data-dir /tmp/node1
"""

from .node import (
    IN_PROCESS_THREAD,
    DemoNodeApp,
    build_demo_server,
    create_demo_app,
    main,
    quiet_in_process_server,
)

__all__ = [
    "IN_PROCESS_THREAD",
    "DemoNodeApp",
    "build_demo_server",
    "create_demo_app",
    "main",
    "quiet_in_process_server",
]
