"""Images made in memory and a local image server on 127.0.0.1, for tests that send image_url parts.

Everything here stays on loopback: the server binds 127.0.0.1 on a free port, in the running event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import pathlib
import ssl
import subprocess
from dataclasses import dataclass, field
from typing import AsyncIterator

import tornado.httpserver
import tornado.netutil
import tornado.web
from PIL import Image


def make_image(fmt: str = "PNG", size: tuple[int, int] = (40, 30), mode: str = "RGB", **save) -> bytes:
    """A small deterministic image: a gradient, so pixels differ and conversions can be compared."""
    vertical = Image.linear_gradient("L").resize(size)
    horizontal = Image.linear_gradient("L").rotate(90).resize(size)
    if mode == "L":
        img = vertical
    else:
        bands = [horizontal, vertical, Image.new("L", size, 128)]
        if mode == "RGBA":
            bands.append(Image.new("L", size, 200))
        img = Image.merge(mode, bands)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def make_noise_png(size: tuple[int, int]) -> bytes:
    """Incompressible pixels: a PNG whose file size is about 3 bytes per pixel."""
    img = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_bomb(size: tuple[int, int] = (6300, 6300), mode: str = "RGBA", fmt: str = "PNG") -> bytes:
    """A decompression bomb: a uniform image, a few hundred KiB at most, that decodes to size[0] * size[1]
    pixels (6300x6300 RGBA: ~154 KB of PNG, 159 MB decoded)."""
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_data_url(url: str) -> tuple[str, Image.Image]:
    head, _, payload = url.partition(",")
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    return head, img


def pixels(img: Image.Image, mode: str = "RGB") -> bytes:
    return img.convert(mode).tobytes()


def image_message(*urls: str, text: str = "What is in this image?") -> list[dict]:
    """One user message: the image parts first (moondream prefers that), then the text."""
    content: list[dict] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@dataclass
class ImageServer:
    base: str  # http://127.0.0.1:PORT
    port: int
    hits: list[str] = field(default_factory=list)  # paths requested, in order
    headers: list[dict[str, str]] = field(default_factory=list)  # request headers, in order
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # /gate: open once enough requests wait
    waiting: int = 0  # requests waiting at the gate now
    most_waiting: int = 0  # the most that waited at once

    def url(self, path: str) -> str:
        return self.base + path


PNG = make_image("PNG")
GIF = make_image("GIF")


class _Handler(tornado.web.RequestHandler):
    def prepare(self) -> None:
        server: ImageServer = self.settings["server"]
        server.hits.append(self.request.path)
        server.headers.append(dict(self.request.headers))


class PngHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "image/png")
        self.set_header("Set-Cookie", "session=secret; Path=/")
        self.write(PNG)


class GifHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "image/gif")
        self.write(GIF)


class RedirectHandler(_Handler):
    def get(self, target: str) -> None:
        targets = {"png": "/png", "private": "http://10.0.0.1/x", "loop": "/redirect/loop", "rel": "png"}
        self.redirect(targets[target], status=302)


class HtmlHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html")
        self.write("<html><body>not an image</body></html>")


class NotFoundHandler(_Handler):
    def get(self) -> None:
        self.set_status(404)
        self.set_header("Content-Type", "image/png")
        self.write(PNG)


class CorruptHandler(_Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "image/png")
        self.write(PNG[:20] + b"\x00garbage" * 20)


class StreamHandler(_Handler):
    """An image/png body streamed in chunks without Content-Length, as long as asked (?kib=N)."""

    async def get(self) -> None:
        self.set_header("Content-Type", "image/png")
        chunk = b"\x89" * 16384
        for _ in range(int(self.get_argument("kib", "1024")) // 16):
            self.write(chunk)
            await self.flush()


class BigHandler(_Handler):
    """A body that announces its size (Content-Length) up front."""

    def get(self) -> None:
        self.set_header("Content-Type", "image/png")
        self.write(b"\x89" * int(self.get_argument("bytes", "200000")))


class GateHandler(_Handler):
    """Answers the PNG once ?n= requests are waiting for it at the same time (all of them then)."""

    async def get(self) -> None:
        server: ImageServer = self.settings["server"]
        server.waiting += 1
        server.most_waiting = max(server.most_waiting, server.waiting)
        if server.waiting >= int(self.get_argument("n")):
            server.gate.set()
        try:
            await server.gate.wait()
        finally:
            server.waiting -= 1
        self.set_header("Content-Type", "image/png")
        self.write(PNG)


class HangHandler(_Handler):
    """Never answers (until the server shuts down)."""

    async def get(self) -> None:
        await self.settings["stop"].wait()


@dataclass
class TLSFiles:
    ca: str  # PEM of the test CA, for a client's trust store
    cert: str  # leaf certificate for ``names``, signed by the CA
    key: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)


def make_tls_files(directory: str, *names: str) -> TLSFiles:
    """A throwaway CA and a server certificate for ``names`` (DNS SANs), made with the openssl CLI."""
    d = pathlib.Path(directory)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE"]
    ca_ext += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    openssl("req", "-x509", *ec, *ca_ext, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=CA")  # fmt: skip
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={names[0]}")
    (d / "leaf.ext").write_text(
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")  # fmt: skip
    return TLSFiles(ca=str(d / "ca.pem"), cert=str(d / "leaf.pem"), key=str(d / "leaf.key"))


@contextlib.asynccontextmanager
async def image_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[ImageServer]:
    """The image server on 127.0.0.1 and a free port; https when given a server SSL context."""
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    server = ImageServer(base=f"{scheme}://127.0.0.1:{port}", port=port)
    stop = asyncio.Event()
    app = tornado.web.Application(
        [
            (r"/png", PngHandler),
            (r"/gif", GifHandler),
            (r"/redirect/(\w+)", RedirectHandler),
            (r"/html", HtmlHandler),
            (r"/missing", NotFoundHandler),
            (r"/corrupt", CorruptHandler),
            (r"/stream", StreamHandler),
            (r"/big", BigHandler),
            (r"/gate", GateHandler),
            (r"/hang", HangHandler),
        ],
        server=server,
        stop=stop,
    )
    http = tornado.httpserver.HTTPServer(app, ssl_options=ssl_context)
    http.add_sockets(sockets)
    try:
        yield server
    finally:
        stop.set()
        http.stop()
        await http.close_all_connections()
