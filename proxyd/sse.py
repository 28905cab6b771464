"""Server-sent events: an incremental parser for the upstream stream and the event writer.

Pure code (no I/O), property-tested. Ollama sends ``data: <json>\\n\\n`` events only, but other
OpenAI-compatible servers use CRLF line ends, comments (``: ping``) and multi-line data; all are
accepted. Only ``data`` fields matter to an OpenAI stream.
"""

from __future__ import annotations

DONE = b"[DONE]"


class SSEParser:
    __slots__ = ("_buf", "_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the last byte seen was a CR: an LF right after it belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        """Adds bytes; returns the data payload of every event completed by them, in order."""
        if self._cr and chunk:
            self._cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if chunk.endswith(b"\r"):
            self._cr = True
        buf = self._buf + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *blocks, self._buf = buf.split(b"\n\n")
        out = []
        for block in blocks:
            data = _event_data(block)
            if data is not None:
                out.append(data)
        return out

    def tail(self) -> bytes:
        """Bytes of an event not yet terminated (non-empty at end of stream = a truncated stream)."""
        return self._buf.strip(b"\r\n")


def _event_data(block: bytes) -> bytes | None:
    if block.startswith(b"data: ") and b"\n" not in block:  # the common case: one data line
        return block[6:]
    lines = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        # comments (':...'), event:, id:, retry: and blank lines carry nothing we relay
    return b"\n".join(lines) if lines else None


def event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
