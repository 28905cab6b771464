"""Newline-delimited JSON: the incremental parser for the streams of Ollama's native API (/api/...).

Pure code (no I/O). Ollama writes one JSON object a line, ``\\n`` after each (server/routes.go
streamResponse), and nothing that ends the stream: the last object says ``done: true`` (the endpoint
sees it: ``MeteredCall.upstream_done``). One exception: an answer that never became a stream (an
empty prompt only loads the model) is written by gin's ``c.JSON``, one object *without* a newline,
even when a stream was asked for. A buffered tail that is a whole JSON object is therefore an event
too; a line cut in the middle never parses as one (a JSON object's proper prefix is never a JSON
object), so it waits for its newline.
"""

from __future__ import annotations

from . import jsonio


class NDJSONParser:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Adds bytes; returns every complete line (without its line end), blank lines skipped."""
        buf = self._buf + chunk if self._buf else chunk
        *lines, tail = buf.split(b"\n")
        out = [line.rstrip(b"\r") for line in lines if line and not line.isspace()]
        if tail.endswith(b"}") and _is_object(tail):
            out.append(tail)
            tail = b""
        self._buf = tail
        return out

    def tail(self) -> bytes:
        """Bytes of a line not yet terminated (non-empty at the end of a stream: a truncated stream)."""
        return self._buf.strip()


def _is_object(data: bytes) -> bool:
    try:
        return isinstance(jsonio.loads(data), dict)
    except ValueError:
        return False
