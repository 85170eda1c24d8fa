"""``vlkit serve``: the HTTP API on a real uvicorn server (search, images, caption, answer,
zero-shot, heat-map), its refusals (oversized, non-image, decompression bomb, paths out of the
index's folders), 50 concurrent requests, and the page itself in headless Chromium."""
import base64
import http.client
import io
import json
import os
import shutil
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import vlkit
from vlkit.index import build_index, open_index

from vlkit.pipeline import Pipeline, image_transform
from vlkit.serve import RequestError, Service, bind, make_server

LIMIT = 300 * 1024  # the test server's upload limit


@pytest.fixture(scope="module")
def setup(untrained_run, tmp_path_factory):
    """A tiny BLIP, an index of 6 pictures built with it, a secret file beside the folder."""
    from vlkit.data.synthetic import SyntheticWorld
    base = tmp_path_factory.mktemp("serve")
    photos = base / "photos"
    photos.mkdir()
    for i, r in enumerate(SyntheticWorld(seed=0, image_size=64).records("test", 6)):
        r["image"].save(photos / f"{i:02d}.png")
    (base / "secret.txt").write_text("SECRET CONTENT")
    pipe = vlkit.load(untrained_run("blip"))
    build_index(pipe, [photos], base / "idx", batch_size=6, progress=False)
    return {"base": base, "photos": photos, "pipe": pipe, "index": open_index(base / "idx")}


class Server:
    """A uvicorn server for a `Service` on a free loopback port, in a thread."""

    def __init__(self, service: Service):
        self.service = service
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = make_server(service)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def request(self, method: str, path: str, body=None, headers=None, chunked=False):
        """(status, headers, body) of a raw request: the path is sent exactly as given."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            res = conn.getresponse()
            return res.status, dict(res.getheaders()), res.read()
        finally:
            conn.close()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, fields: dict, file: bytes | None = None, name: str = "image.png", chunked=False):
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        if file is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + file + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if chunked:
            return self.request("POST", path, body=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                                headers=headers, chunked=True)
        return self.request("POST", path, body=body, headers=headers)


@pytest.fixture(scope="module")
def server(setup):
    s = Server(Service(setup["pipe"], setup["index"], max_upload=LIMIT, max_pixels=1_000_000))
    yield s
    s.stop()


def _png(path) -> bytes:
    return open(path, "rb").read()


def _detail(body: bytes) -> str:
    return json.loads(body)["detail"]


def test_page_and_info(server):
    status, headers, body = server.get("/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html") and "<script>" in page
    for external in ('src="http', "src='http", 'href="http', "@import", "cdn"):  # works offline
        assert external not in page.lower()
    status, _, body = server.get("/api/info")
    info = json.loads(body)
    assert status == 200 and info["model"] == "blip" and info["images"] == 6
    assert info["abilities"] == {"search": True, "caption": True, "answer": True, "classify": True, "explain": True}


def test_search_returns_images_the_server_serves(server, setup):
    status, _, body = server.get("/api/search?q=a%20red%20circle&k=3")
    results = json.loads(body)["results"]
    assert status == 200 and [r["rank"] for r in results] == [1, 2, 3]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))
    for r in results:
        status, headers, data = server.get(r["url"])
        assert status == 200 and headers["content-type"] == "image/png"
        assert data == _png(setup["photos"] / r["rel"])
    assert server.get("/api/search?q=%20&k=3")[0] == 400
    assert server.get("/api/search?q=x&k=0")[0] == 400


def test_uploads_get_caption_answer_classes_and_heat_map(server, setup):
    png = _png(setup["photos"] / "00.png")
    status, _, body = server.post("/api/caption", {}, png)
    assert status == 200 and isinstance(json.loads(body)["caption"], str)
    status, _, body = server.post("/api/answer", {"question": "what color is the cross?"}, png)
    assert status == 200 and isinstance(json.loads(body)["answer"], str)
    status, _, body = server.post("/api/classify", {"labels": "red circle, blue square,green star"}, png)
    labels = json.loads(body)["labels"]
    assert status == 200 and sorted(x["label"] for x in labels) == ["blue square", "green star", "red circle"]
    assert abs(sum(x["probability"] for x in labels) - 1) < 1e-4
    assert all(a["probability"] >= b["probability"] for a, b in zip(labels, labels[1:]))
    status, _, body = server.post("/api/explain", {"text": "a red circle"}, png)
    res = json.loads(body)
    assert status == 200 and res["words"] == ["a", "red", "circle"]
    picture = Image.open(io.BytesIO(base64.b64decode(res["image"].split(",", 1)[1])))
    assert picture.format == "PNG" and picture.size == (4 * 128, 128 + 16)
    status, _, body = server.post("/api/classify", {"labels": " , "}, png)
    assert status == 400 and "labels" in _detail(body)
    status, _, body = server.post("/api/explain", {"text": "   "}, png)
    assert status == 400 and "text" in _detail(body)
    assert server.post("/api/answer", {}, png)[0] == 422  # no question


def test_a_model_refusing_its_input_is_a_400_not_a_crash(server, setup, monkeypatch):
    def refuse(images, **kwargs):
        raise ValueError("caption: the image is too dull to describe")
    monkeypatch.setattr(server.service.pipe, "caption", refuse)
    status, _, body = server.post("/api/caption", {}, _png(setup["photos"] / "00.png"))
    assert status == 400 and _detail(body) == "caption: the image is too dull to describe"


def test_oversized_non_image_and_bomb_uploads_are_refused(server, setup):
    big = os.urandom(LIMIT + 100 * 1024)
    for chunked in (False, True):  # refused from Content-Length, and while a chunked body arrives
        status, _, body = server.post("/api/caption", {}, big, chunked=chunked)
        assert status == 413 and "over the upload limit" in _detail(body), chunked
    status, _, body = server.post("/api/caption", {}, b"just some text, not a picture", name="notes.txt")
    assert status == 415 and "not a readable image" in _detail(body) and "notes.txt" in _detail(body)
    status, _, body = server.post("/api/caption", {}, _png(setup["photos"] / "01.png")[:120])
    assert status == 415 and "truncated" in _detail(body)
    bomb = io.BytesIO()
    Image.new("1", (2000, 2000)).save(bomb, format="PNG")  # 4 million pixels in a few kilobytes
    assert len(bomb.getvalue()) < 10_000
    status, _, body = server.post("/api/caption", {}, bomb.getvalue())
    assert status == 413 and "exceeds the limit of 1000000" in _detail(body)
    assert server.get("/api/info")[0] == 200  # still up


def test_files_outside_the_index_are_not_served(server, setup):
    secret = setup["base"] / "secret.txt"
    for path in ("/files/0/../secret.txt", "/files/0/%2e%2e/secret.txt", "/files/0/..%2fsecret.txt",
                 f"/files/0/{secret}", f"/files/0/%2F{str(secret).lstrip('/')}", "/files/0//etc/passwd",
                 "/files/1/00.png", "/files/-1/00.png", "/files/0/missing.png"):
        status, _, body = server.get(path)
        assert status in (403, 404, 422) and b"SECRET" not in body and b"root:" not in body, path
    # an indexed image replaced by a link out of its folder (or inside a folder that is a link)
    victim = setup["photos"] / "05.png"
    kept = victim.read_bytes()
    victim.unlink()
    victim.symlink_to(secret)
    try:
        status, _, body = server.get("/files/0/05.png")
        assert status == 403 and b"SECRET" not in body
    finally:
        victim.unlink()
        victim.write_bytes(kept)
    assert server.get("/files/0/05.png")[0] == 200
    (setup["photos"] / "link.png").symlink_to(secret)  # a link that was never indexed
    assert server.get("/files/0/link.png")[0] == 404


def test_fifty_concurrent_requests_all_succeed(server, setup):
    png = _png(setup["photos"] / "02.png")
    start = threading.Barrier(50)

    def one(i):
        start.wait()
        if i % 2:
            return server.get("/api/search?q=a%20blue%20square&k=4")
        return server.post("/api/classify", {"labels": "red circle, blue square"}, png)
    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(one, range(50)))
    assert [r[0] for r in replies] == [200] * 50
    searches = {r[2] for i, r in enumerate(replies) if i % 2}
    classes = {r[2] for i, r in enumerate(replies) if not i % 2}
    assert len(searches) == 1 and len(classes) == 1  # the same answers under load


def test_what_a_model_cannot_do_is_a_400_naming_it(setup):
    clip = vlkit.create_model("clip", "tiny")
    service = Service(Pipeline(clip, None, image_transform(clip)))
    assert service.abilities() == {"search": False, "caption": False, "answer": False, "classify": True,
                                   "explain": False}
    image = Image.new("RGB", (32, 32))
    for call, args, needle in ((service.caption, (image,), "no text decoder"),
                               (service.explain, (image, "a cat"), "no text-to-image cross-attention"),
                               (service.search, ("a cat", 3), "no image index")):
        with pytest.raises(RequestError, match=needle) as e:
            call(*args)
        assert e.value.status == 400


def test_cli_without_the_extra_is_one_line(setup, monkeypatch, capsys):
    from vlkit.cli import main
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", setup["pipe"].source]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vlkit: error: vlkit serve needs the serve extra (missing fastapi): pip install 'vlkit[serve]'"


def test_vlkit_serve_command_listens_on_loopback(setup, monkeypatch, capsys):
    """``vlkit serve`` through the command line (in a thread; its uvicorn server is stopped the
    way Ctrl-C stops it): it says where it listens, on loopback, and answers there."""
    import urllib.request

    import vlkit.serve
    from vlkit.cli import main
    servers, codes = [], []
    real = vlkit.serve.make_server
    monkeypatch.setattr(vlkit.serve, "make_server", lambda service: servers.append(real(service)) or servers[-1])
    argv = ["serve", setup["pipe"].source, "--index", str(setup["base"] / "idx"), "--port", "0"]
    thread = threading.Thread(target=lambda: codes.append(main(argv)), daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not (servers and servers[0].started):
        assert time.time() < deadline and thread.is_alive(), capsys.readouterr().err
        time.sleep(0.05)
    try:
        line = capsys.readouterr().out
        assert line.startswith("serving blip from") and "with 6 indexed images on http://127.0.0.1:" in line, line
        url = line.split(" on ")[1].split()[0]
        assert json.loads(urllib.request.urlopen(url + "api/info", timeout=30).read())["images"] == 6
    finally:
        servers[0].should_exit = True
        thread.join(timeout=30)
    assert codes == [0]


def test_the_page_in_headless_chromium(server, setup):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium on PATH: this test drives the page in headless Chromium (Debian/Ubuntu: "
                    "apt-get install chromium) through playwright's Python package (vlkit[test])")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('blip')")
            page.fill("#query", "a red circle above a square")
            page.fill("#k", "4")
            page.click("#search-form button")
            page.wait_for_function("document.querySelectorAll('#results img').length === 4 && "
                                   "[...document.querySelectorAll('#results img')].every(i => i.complete)")
            widths = page.eval_on_selector_all("#results img", "imgs => imgs.map(i => i.naturalWidth)")
            assert widths == [64] * 4
            page.set_input_files("#file", str(setup["photos"] / "03.png"))
            page.fill("#question", "what shape is it?")
            page.fill("#labels", "red circle, blue square")
            page.click("#upload-form button")
            page.wait_for_function("document.getElementById('upload-status').textContent.startsWith('done')",
                                   timeout=60_000)
            status = page.text_content("#upload-status")
            assert "caption" in status and "answer" in status and "zero-shot" in status and "heat-map" in status
            assert page.eval_on_selector("#heatmap", "i => i.naturalWidth") > 128
            assert page.locator("#zeroshot tr").count() == 2
            assert page.is_visible("#caption-title")
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"not a picture"}])
            page.click("#upload-form button")
            page.wait_for_function("document.getElementById('upload-status').classList.contains('error')")
            assert "415" in page.text_content("#upload-status")
            assert errors == []
        finally:
            browser.close()


@pytest.mark.parametrize("chunks, left", [([50], 0), ([8, 8, 8], 0), ([8, 8, 8, 8, 8, 8], 2)])
def test_body_limit_reads_the_rest_of_a_refused_body_and_never_waits_past_its_end(chunks, left):
    """The 413 comes after the rest of the body is read (so a client still sending reads it), but
    never waits for more once the last body message has arrived (receive() would then wait for a
    disconnect that a client awaiting its response never sends). Limit 10: the 2nd message of 8
    bytes crosses it; the rest is read up to another 10 bytes (``left``: the messages not read)."""
    import asyncio

    from vlkit.serve import BodyLimit
    messages = [{"type": "http.request", "body": b"x" * n, "more_body": i < len(chunks) - 1}
                for i, n in enumerate(chunks)]
    sent = []

    async def receive():
        assert messages, "receive() after the last body message"
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # reads its body to the end, then answers
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    asyncio.run(BodyLimit(app, limit=10, upload=8)({"type": "http", "headers": []}, receive, send))
    assert sent[0]["status"] == 413 and b"over the upload limit" in sent[1]["body"]
    assert len(messages) == left
