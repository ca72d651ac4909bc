"""``tightrope serve``: a bundle behind HTTP (Starlette on uvicorn), torch-free.

``POST /predict`` with ``{"text": "..."}`` answers ``{"label": ..., "probabilities": {...}}``; with
``{"texts": ["...", ...]}`` (at most ``max_batch``) it answers ``{"predictions": [...]}`` in order.
``GET /health`` answers the labels and limits.

Bad input is refused before the model sees it, each with a 4xx status and ``{"error": one
sentence}``: malformed JSON or a body that is not UTF-8 (400), a wrong or missing field, a
non-string or empty text (422), a text above ``max_chars`` characters, a batch above ``max_batch``
texts or a body above what those two allow (413). Unknown paths (404) and methods (405) answer
the same way. The model runs in a worker thread (at most ``concurrency`` runs at once), so the
event loop keeps answering while it computes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tightrope.serving.bundle import Bundle

log = logging.getLogger("tightrope.serve")

DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_CHARS = 50_000  # IMDB's longest test review has 13,704 characters


class Refused(Exception):
    """A request the server will not run, with its status and one sentence for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_request(body: bytes, *, max_batch: int, max_chars: int) -> tuple[list[str], bool]:
    """``(texts, single)`` from a request body, or :class:`Refused` saying what is wrong with it."""
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise Refused(400, "The request body is not UTF-8 text.") from None
    except json.JSONDecodeError as err:
        raise Refused(400, f"The request body is not valid JSON ({err.msg} at character {err.pos}).") from None
    if not isinstance(payload, dict):
        raise Refused(422, "The request body must be a JSON object with a 'text' string or a 'texts' list.")
    unknown = sorted(set(payload) - {"text", "texts"})
    if unknown:
        raise Refused(422, f"Unknown field '{unknown[0]}'; send a 'text' string or a 'texts' list.")
    if ("text" in payload) == ("texts" in payload):
        raise Refused(422, "Send exactly one of 'text' (a string) or 'texts' (a list of strings).")
    single = "text" in payload
    texts = [payload["text"]] if single else payload["texts"]
    if not isinstance(texts, list):
        raise Refused(422, "'texts' must be a list of strings.")
    if not texts:
        raise Refused(422, "'texts' is empty; send at least one text.")
    if len(texts) > max_batch:
        raise Refused(413, f"The batch holds {len(texts)} texts; the limit is {max_batch} per request.")
    for i, text in enumerate(texts):
        where = "'text'" if single else f"Text {i}"
        if not isinstance(text, str):
            raise Refused(422, f"{where} is a {type(text).__name__}, not a string.")
        if not text.strip():
            raise Refused(422, f"{where} is empty.")
        if len(text) > max_chars:
            raise Refused(413, f"{where} has {len(text):,} characters; the limit is {max_chars:,}.")
    return texts, single


def create_app(bundle: Bundle, *, max_batch: int = DEFAULT_MAX_BATCH, max_chars: int = DEFAULT_MAX_CHARS,
               batch_size: int = 32, concurrency: int = 1):
    """The Starlette application serving ``bundle``."""
    import anyio  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.exceptions import HTTPException  # noqa: PLC0415
    from starlette.responses import JSONResponse  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    # 6 bytes per character covers JSON's \uXXXX escapes; 64 kB covers the rest of the body
    max_body = max_batch * max_chars * 6 + 65_536
    limiter = anyio.CapacityLimiter(concurrency)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read_body(request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise Refused(413, f"The request body has {int(declared):,} bytes; the limit is {max_body:,}.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise Refused(413, f"The request body exceeds {max_body:,} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    async def predict(request):
        try:
            texts, single = parse_request(await read_body(request), max_batch=max_batch, max_chars=max_chars)
        except Refused as refused:
            return error(refused.status, refused.message)
        try:
            predictions = await anyio.to_thread.run_sync(bundle.predict, texts, batch_size, limiter=limiter)
        except Exception:  # a fault of the server, not of the request
            log.exception("prediction failed")
            return error(500, "The model failed on this request; the server logged the cause.")
        return JSONResponse(predictions[0] if single else {"predictions": predictions})

    async def health(request):
        return JSONResponse({"status": "ok", "labels": bundle.label_names, "max_batch": max_batch,
                             "max_chars": max_chars, "max_length": bundle.max_length, "truncation": bundle.truncation})

    async def http_error(request, exc: HTTPException):
        messages = {404: f"There is no {request.url.path}; POST /predict or GET /health.",
                    405: f"{request.method} is not allowed on {request.url.path}."}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail).rstrip(".") + "."))

    routes = [Route("/predict", predict, methods=["POST"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def serve(bundle_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          max_batch: int = DEFAULT_MAX_BATCH, max_chars: int = DEFAULT_MAX_CHARS, batch_size: int = 32,
          concurrency: int = 1, log_level: str = "warning") -> None:
    """Load the bundle and serve it until interrupted."""
    import uvicorn  # noqa: PLC0415

    bundle = Bundle(bundle_dir, threads=threads)
    app = create_app(bundle, max_batch=max_batch, max_chars=max_chars, batch_size=batch_size, concurrency=concurrency)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
