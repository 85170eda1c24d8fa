"""``vlkit serve``: a local demo page for a model, and an image index to search.

A small ASGI app (FastAPI on uvicorn, the ``vlkit[serve]`` extra) serves one HTML page (plain
HTML and a little JavaScript, nothing fetched from elsewhere) and a JSON API under ``/api``:

    GET  /api/info                       the model, what it can do, the index's size, the limits
    GET  /api/search?q=TEXT&k=12         the index's nearest images to a text
    GET  /files/ROOT/PATH                an indexed image (only those, only inside their folder)
    POST /api/caption   file             a caption (models with a decoder: blip)
    POST /api/answer    file, question   an answer (models that answer questions)
    POST /api/classify  file, labels     zero-shot probabilities over comma-separated labels
    POST /api/explain   file, text       per-word cross-attention heat-maps (albef, blip), a PNG

Uploads are refused, with a 4xx and a one-line ``detail``, when the request body is over the
size limit (413), when they are not a readable image (415) and when the image has more pixels
than the limit (413: a decompression bomb is refused before it is decoded). Model calls run one
at a time under a lock, in FastAPI's thread pool, so concurrent requests queue rather than fail.
"""
import base64
import io
import mimetypes
import socket
import sys
import threading
from pathlib import Path

DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_PIXELS = 25_000_000  # 5000 x 5000
PAGE = Path(__file__).with_name("serve.html")
FORM_ALLOWANCE = 64 * 1024  # request bytes allowed beside the uploaded file (the form's fields)
EXTRA = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
UNABLE = {"caption": "has no text decoder to caption with (blip does)",
          "answer": "does not answer questions",
          "classify": "does not embed images and texts into one space (zero-shot needs clip, albef, vlmo, blip)",
          "explain": "has no text-to-image cross-attention to draw (albef, blip)"}


class MissingExtra(ValueError):
    """The serve extra (FastAPI, uvicorn, python-multipart) is not installed."""


class RequestError(ValueError):
    """A request the service refuses: ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def require_extra() -> None:
    missing = [package for package, modules in EXTRA.items() if not any(map(_importable, modules))]
    if missing:
        raise MissingExtra(f"vlkit serve needs the serve extra (missing {', '.join(missing)}): "
                           "pip install 'vlkit[serve]'")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---- the service: the model behind the page, without HTTP ---------------------------------------

class Service:
    """A pipeline (and optionally an image index built with it); model calls one at a time."""

    def __init__(self, pipe, index=None, max_upload: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.pipe, self.index = pipe, index
        self.max_upload, self.max_pixels = max_upload, max_pixels
        self.lock = threading.Lock()
        self.entries = set(index.entries) if index is not None else set()

    def abilities(self) -> dict:
        model = self.pipe.model
        embeds = hasattr(model, "encode_image") and hasattr(model, "encode_text")
        return {"search": self.index is not None and len(self.index) > 0,
                "caption": hasattr(model, "generate"),
                "answer": any(hasattr(model, n) for n in ("answer_tokens", "answer", "vqa_logits")),
                "classify": embeds,
                "explain": hasattr(model, "cross_attention_maps")}

    def info(self) -> dict:
        return {"model": self.pipe.model.model_name, "source": self.pipe.source, "abilities": self.abilities(),
                "images": len(self.index) if self.index is not None else 0,
                "max_upload_bytes": self.max_upload, "max_pixels": self.max_pixels}

    def _able(self, task: str) -> None:
        if not self.abilities()[task]:
            name = self.pipe.model.model_name
            raise RequestError(400, "the server has no image index (start it with --index)" if task == "search"
                               else f"{name} {UNABLE[task]}")

    # -- index --------------------------------------------------------------------------------
    def search(self, query: str, k: int) -> list[dict]:
        from urllib.parse import quote

        from .index import search_index
        self._able("search")
        if not query.strip():
            raise RequestError(400, "the search text is empty")
        if not 1 <= k <= 1000:
            raise RequestError(400, f"k must be 1 to 1000, got {k}")
        with self.lock:
            results = search_index(self.index, self.pipe, query, k)
        for r in results:
            r["url"] = f"/files/{r['root']}/{quote(r['rel'])}"
        return results

    def file(self, root: int, rel: str) -> Path:
        """The indexed image ROOT/REL, which must still lie inside its folder (links resolved)."""
        from .index import inside
        if self.index is None or (root, rel) not in self.entries:
            raise RequestError(404, "no such image in the index")
        base = self.index.roots[root]
        path = base / rel
        if not inside(path, base):
            raise RequestError(403, "the file is not inside the index's folders")
        if not path.is_file():
            raise RequestError(404, "the image is no longer there")
        return path

    # -- uploads ------------------------------------------------------------------------------
    def image(self, data: bytes, name: str):
        """An uploaded file as an RGB image, or a `RequestError`: over the size limit (413),
        not an image (415), more pixels than the limit (413)."""
        from .data.transforms import ImageError, load_image
        if len(data) > self.max_upload:
            raise RequestError(413, f"the upload is {len(data)} bytes or more, over the upload limit of "
                                    f"{self.max_upload} bytes ({self.max_upload / 2**20:g} MB)")
        try:
            return load_image(io.BytesIO(data), max_pixels=self.max_pixels, name=f"upload {name!r}")
        except ImageError as e:
            raise RequestError(413 if e.reason == "image too large" else 415, str(e)) from None

    def caption(self, image) -> str:
        self._able("caption")
        with self.lock:
            return self.pipe.caption([image])[0]

    def answer(self, image, question: str) -> str:
        self._able("answer")
        if not question.strip():
            raise RequestError(400, "the question is empty")
        with self.lock:
            return self.pipe.answer([image], [question])[0]

    def classify(self, image, labels: str) -> list[dict]:
        self._able("classify")
        names = list(dict.fromkeys(x.strip() for x in labels.split(",") if x.strip()))
        if not names:
            raise RequestError(400, "give labels, separated by commas (e.g. 'red circle, blue square')")
        with self.lock:
            probs = self.pipe.zero_shot([image], names)[0].tolist()
        ranked = sorted(zip(names, probs), key=lambda x: -x[1])
        return [{"label": n, "probability": p} for n, p in ranked]

    def explain(self, image, text: str) -> dict:
        from .explain import explain
        self._able("explain")
        if not text.strip():
            raise RequestError(400, "give the text whose words to explain")
        with self.lock:
            res = explain(self.pipe, image, text, panel=128)
        buf = io.BytesIO()
        res["picture"].save(buf, format="PNG")
        return {"words": res["words"], "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}


# ---- HTTP -------------------------------------------------------------------------------------

class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request whose body is over ``limit`` bytes gets a 413 (refused from its
    Content-Length before it is read, or as soon as the bytes received pass the limit), whose
    message names ``upload``, the user's limit on the file (``limit`` allows for the form)."""

    def __init__(self, app, limit: int, upload: int):
        self.app, self.limit, self.upload = app, limit, upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive)
            return await self._refuse(send, int(length))
        received, started, over, ended = 0, False, False, False

        async def counted():
            nonlocal received, over, ended
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if received > self.limit:
                    over = True
                    raise _TooLarge()
            return message

        async def watched(message):
            nonlocal started
            if over:  # the app's reply to a body cut short (an error of its own) gives way to the 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            pass
        if over and not started:
            if not ended:  # (after the last body message, receive() would wait for a disconnect)
                await self._drain(receive)
            await self._refuse(send, received)

    async def _drain(self, receive) -> None:
        """Read and drop the rest of a refused body, up to another ``limit`` bytes: a client still
        sending it (a browser, http.client) then reads the 413 instead of a reset connection. A
        body longer than that is cut off."""
        budget = self.limit
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send, size: int):
        import json
        body = json.dumps({"detail": f"the request is {size} bytes or more, over the upload limit of "
                                     f"{self.upload} bytes ({self.upload / 2**20:g} MB)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(service: Service):
    """The FastAPI app for ``service``."""
    require_extra()
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    from .pipeline import Unsupported

    app = FastAPI(title="vlkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=service.max_upload + FORM_ALLOWANCE, upload=service.max_upload)

    @app.exception_handler(RequestError)
    def refused(request: Request, e: RequestError):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(ValueError)  # the pipeline's word on its inputs (e.g. a text with no words)
    @app.exception_handler(Unsupported)
    def bad_input(request: Request, e: Exception):
        return JSONResponse({"detail": str(e).splitlines()[0] if str(e) else type(e).__name__}, status_code=400)

    def upload(file: UploadFile):
        return service.image(file.file.read(service.max_upload + 1), file.filename or "file")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    @app.get("/api/info")
    def info():
        return service.info()

    @app.get("/api/search")
    def search(q: str, k: int = 12):
        return {"query": q, "results": service.search(q, k)}

    @app.get("/files/{root}/{rel:path}")
    def files(root: int, rel: str):
        path = service.file(root, rel)
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    @app.post("/api/caption")
    def caption(file: UploadFile = File(...)):
        return {"caption": service.caption(upload(file))}

    @app.post("/api/answer")
    def answer(file: UploadFile = File(...), question: str = Form(...)):
        return {"question": question, "answer": service.answer(upload(file), question)}

    @app.post("/api/classify")
    def classify(file: UploadFile = File(...), labels: str = Form(...)):
        return {"labels": service.classify(upload(file), labels)}

    @app.post("/api/explain")
    def explain(file: UploadFile = File(...), text: str = Form(...)):
        return service.explain(upload(file), text)

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port); an OSError names them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    return sock


def make_server(service: Service):
    """A uvicorn server for ``service``; ``server.run(sockets=[bind(host, port)])`` serves."""
    import uvicorn
    return uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))


def open_service(model: str | Path, index: str | Path | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Service:
    """A `Service` for a run or Hugging Face folder and an index built with the same weights."""
    from .index import check_model, model_record, open_index
    from .pipeline import load
    if max_upload_mb <= 0 or max_pixels < 1:
        raise ValueError(f"the upload limit must be above 0 MB and the pixel limit at least 1, got "
                         f"{max_upload_mb:g} and {max_pixels}")
    pipe = load(model)
    idx = None
    if index is not None:
        idx = open_index(index)
        check_model(idx.manifest, model_record(pipe), str(index))
    return Service(pipe, idx, int(max_upload_mb * 2**20), max_pixels)


def serve(model: str | Path, index: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """``vlkit serve``: serve the page until interrupted."""
    require_extra()
    service = open_service(model, index, max_upload_mb, max_pixels)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {service.pipe.model.model_name} from {model}"
          + (f" with {len(service.index)} indexed images" if service.index is not None else "")
          + f" on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}, not only this machine: the page has no login", file=sys.stderr)
    make_server(service).run(sockets=[sock])


__all__ = ["Service", "RequestError", "MissingExtra", "create_app", "make_server", "bind", "open_service",
           "serve", "require_extra", "BodyLimit"]
