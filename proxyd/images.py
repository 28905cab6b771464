"""Image parts of chat requests: check data URLs, fetch http(s) URLs safely, hand Ollama data URLs it takes.

OpenAI clients send ``{"type": "image_url", "image_url": {"url": ...}}`` parts (or the shorthand
``"image_url": "..."``). Ollama only accepts base64 data URLs of JPEG, PNG or WebP and answers 400 to any
http URL, so before a request is forwarded :class:`ImageInliner` rewrites every image part in place:

* a data URL is decoded strictly and opened with Pillow. JPEG, PNG and WebP pass through untouched;
  GIF, BMP and TIFF become PNG (first frame); anything larger than ``max_dimension`` is downscaled;
* an http(s) URL is fetched by proxyd itself, under SSRF rules (anchors D): http and https only, the
  host is resolved once, *every* resolved address is checked, and the connection goes to exactly the
  checked address. Redirects are followed by hand and each hop is checked the same way. Then the bytes
  are treated like a data URL.

Decoding is bounded three ways, because a few KiB of PNG can decode to 160 MB: each image by
``max_pixels``; each request by ``max_pixels_per_request``, summed from the headers of all its images
before any is decoded; and the process by :class:`DecodeBudget`, an estimate of the memory of the decodes
in progress (see :func:`probe_image`), which decodes wait for. After a large decode, freed memory is
handed back to the OS (glibc ``malloc_trim``).

The fetcher is aiohttp rather than Tornado's ``SimpleAsyncHTTPClient``. aiohttp hands its resolver's
answer straight to the connect call, and it keeps TLS SNI and certificate checks on the original
hostname. Its streamed body (``iter_chunked``) lets us stop past the size cap without string-matching
Tornado's ``max_body_size`` errors. aiohttp is already a runtime dependency (requirements.txt).

Every refusal raises :class:`~proxyd.errors.InvalidRequest`, or :class:`~proxyd.errors.PayloadTooLarge`
for size, naming the part: ``image_url in messages[0].content[1]: refusing to fetch http://10.0.0.5/x.png:
address 10.0.0.5 is private``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import io
import ipaddress
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequest, PayloadTooLarge, ServiceUnavailable

log = logging.getLogger("proxyd.images")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``async def resolve(host, port) -> list of IP strings``. It is injectable so tests can simulate DNS.
Resolver = Callable[[str, int], Awaitable[list[str]]]

USER_AGENT = "proxyd-image-fetch"

# Formats we are willing to decode at all. Pillow can open many more (EPS runs Ghostscript, PSD, ...);
# a short allowlist keeps the attack surface to common, well-fuzzed decoders. MPO (multi-picture JPEG,
# common from phone cameras) is reached through "JPEG".
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# What Ollama accepts, by Pillow format: these pass through unchanged.
OLLAMA_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Data URL prefixes Ollama matches exactly (case-sensitive), by the format they announce.
OLLAMA_PREFIXES = {
    "data:image/jpeg;base64,": "image/jpeg",
    "data:image/jpg;base64,": "image/jpeg",
    "data:image/png;base64,": "image/png",
    "data:image/webp;base64,": "image/webp",
}

# Decoding beyond these sizes runs in a thread so the event loop never stalls on one image.
THREAD_BYTES = 256 * 1024
THREAD_PIXELS = 2_000_000

# What decoding costs, for the decode budget (docs/DESIGN.md, "Decompression bombs add up", has the
# measurements: VmHWM growth of a fresh process running normalize_image on 6300x6300 images of each kind).
# Pillow holds a decoded frame at 1 byte a pixel in modes 1, L and P, 2 in I;16 and 4 in every other mode;
# Pillow's WebP decoder also holds libwebp's canvases and a copy of the frame (16 bytes a pixel measured).
FRAME_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
FORMAT_BYTES_PER_PIXEL = {"WEBP": 16}  # replaces the mode's cost
DECODE_OVERHEAD_BYTES = 16 * 1024 * 1024  # decoder state, the re-encoded output, Python objects
DECODE_THREADS = 2  # Pillow's decoders release the GIL; more threads than cores would only share them
# Rows are converted and reduced a strip of about this many pixels at a time when downscaling.
SHRINK_STRIP_PIXELS = 1_000_000

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 * 1024
URL_SHOWN_CHARS = 200


@dataclass(frozen=True)
class ImagePolicy:
    allow_private_networks: bool = False  # for local testing only: skips the address classes below
    max_bytes: int = 10 * 1024 * 1024  # per image, decoded/downloaded bytes
    timeout_s: float = 10.0  # total per fetch, redirects and body included
    connect_timeout_s: float = 3.0
    max_redirects: int = 3
    max_dimension: int = 1024  # downscale larger images (keep aspect) before forwarding; 0 = never
    allowed_ports: tuple[int, ...] = (80, 443)  # ignored when allow_private_networks
    max_images: int = 8  # per request
    max_pixels: int = 40_000_000  # decompression-bomb guard, width * height of the first frame
    max_pixels_per_request: int = 64_000_000  # all of a request's images, as decoded, from their headers
    decode_memory_bytes: int = 256 * 1024 * 1024  # estimated decoding memory in use at once, process-wide
    decode_wait_s: float = 30.0  # longest wait for decoding room before a retryable 503
    deny_networks: tuple[str, ...] = ()  # CIDRs refused always, even with allow_private_networks
    deny_endpoints: tuple[tuple[str, int], ...] = ()  # (address, port) refused always: the upstream itself


# --------------------------------------------------------------------------------------------------
# Address classification (anchors D.2)

# Named special-purpose ranges, checked in order, so the message says *why*. Anything else that
# ipaddress does not call global is refused as "not globally routable".
_SPECIAL_NETWORKS = [
    (ipaddress.ip_network(net), why)
    for net, why in [
        ("0.0.0.0/8", "unspecified (0.0.0.0/8)"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared address space (CGNAT, 100.64.0.0/10)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved (IETF protocol assignments, 192.0.0.0/24)"),  # 3.11 misses most of it
        ("192.168.0.0/16", "private"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fc00::/7", "unique-local (private)"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ]
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Legacy numeric IPv4 spellings that inet_aton (and so getaddrinfo) accept: 2130706433, 0x7f.1, 127.1.
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


@functools.lru_cache(maxsize=64)
def _parse_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _embedded_ipv4(ip: IPAddress) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries (and the kind of wrapping), if any."""
    if ip.version != 6:
        return None
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def _builtin_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address, or None if it is one."""
    for net, why in _SPECIAL_NETWORKS:
        if ip.version == net.version and ip in net:
            return why
    if ip.version == 6 and ip.teredo is not None:
        return "a Teredo tunnel address (2001::/32)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def refusal_reason(address: str | IPAddress, policy: ImagePolicy, port: int | None = None) -> str | None:
    """Why proxyd must not connect to ``address`` (on ``port``) under ``policy``; None when it may.

    IPv4 embedded in IPv6 (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16) is unwrapped and judged by
    the IPv4 address, because Python 3.11's ``is_global`` is wrong for NAT64, 6to4 and 224.0.0.1
    (anchors D.2). Operator ``deny_networks`` and the upstream's own endpoint apply last and always,
    even with allow_private_networks.
    """
    ip = address if isinstance(address, IPAddress) else ipaddress.ip_address(address)
    embedded = _embedded_ipv4(ip)
    if not policy.allow_private_networks:
        if embedded is not None:
            kind, inner = embedded
            why = _builtin_reason(inner)
            if why is not None:
                return f"{why} ({kind} form of {inner})"
        else:
            why = _builtin_reason(ip)
            if why is not None:
                return why
    if policy.deny_networks:
        candidates = [ip] if embedded is None else [ip, embedded[1]]
        for net in _parse_networks(policy.deny_networks):
            for candidate in candidates:
                if candidate.version == net.version and candidate in net:
                    return f"denied by configuration (deny_networks {net})"
    if policy.deny_endpoints and port is not None:
        endpoints = _parse_endpoints(policy.deny_endpoints)
        if (ip, port) in endpoints or (embedded is not None and (embedded[1], port) in endpoints):
            return "the upstream model server's own address"
    return None


@functools.lru_cache(maxsize=16)
def _parse_endpoints(endpoints: tuple[tuple[str, int], ...]) -> frozenset[tuple[IPAddress, int]]:
    return frozenset((ipaddress.ip_address(host), port) for host, port in endpoints)


def upstream_endpoints(url: str) -> tuple[tuple[str, int], ...]:
    """The (address, port) pairs the upstream URL reaches, looked up once at start, for deny_endpoints.

    With allow_private_networks on (Ollama usually being on loopback or the LAN), an image URL could
    otherwise point at Ollama itself. Only its port is refused, not its whole address, so local image
    servers beside it stay reachable for testing.
    """
    parsed = yarl.URL(url)
    host, port = parsed.host, parsed.port
    if not host or port is None:
        return ()
    literal = literal_ip(host)
    if literal is not None:
        return ((str(literal), port),)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("images: cannot resolve the upstream %s (%s); image URLs to it are not refused by address",
                    host, exc)
        return ()
    return tuple(dict.fromkeys((str(ipaddress.ip_address(info[4][0])), port) for info in infos))


def literal_ip(host: str) -> IPAddress | None:
    """The address a URL host names literally: ``10.0.0.1``, ``::1`` (brackets already stripped), or a
    legacy numeric form such as ``2130706433`` that getaddrinfo would turn into 127.0.0.1."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class AddressRefused(OSError):
    """A host resolved to an address the policy refuses. An OSError so aiohttp passes it along."""


class HostNotFound(OSError):
    """The resolver found no address for a host."""


async def system_resolve(host: str, port: int) -> list[str]:
    """The default resolver: the system's getaddrinfo, run off the event loop by asyncio."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


async def resolve_checked(host: str, port: int, policy: ImagePolicy, resolver: Resolver) -> list[str]:
    """Resolve ``host`` once and return its addresses if *every* one passes the policy.

    The caller connects to exactly these addresses (no second lookup, so DNS rebinding cannot swap a
    public answer for a private one between check and connect).
    """
    literal = literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            answers = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise HostNotFound(f"could not resolve host {host} ({exc})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(a) for a in answers))
        if not addresses:
            raise HostNotFound(f"could not resolve host {host} (no addresses)")
    for ip in addresses:
        why = refusal_reason(ip, policy, port)
        if why is not None:
            if literal is not None:
                shown = f"address {ip}" if str(ip) == host else f"address {host} (= {ip})"
                raise AddressRefused(f"{shown} is {why}")
            raise AddressRefused(f"{host} resolves to {ip}, which is {why}")
    return [str(ip) for ip in addresses]


class _CheckingResolver(AbstractResolver):
    """aiohttp's resolver hook: it looks up once, checks every answer and hands aiohttp only checked
    addresses, which aiohttp then connects to. aiohttp skips resolvers for canonical IP literals, so
    :meth:`ImageInliner._check_url` checks those before any request is made."""

    def __init__(self, policy: ImagePolicy, resolver: Resolver) -> None:
        self._policy = policy
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await resolve_checked(host, port, self._policy, self.resolver)
        return [
            {
                "hostname": host,  # TLS SNI and certificate checks stay on the original name
                "host": a,
                "port": port,
                "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for a in addresses
        ]

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Decoding and conversion (pure, may run in a thread)


class _Bad(Exception):
    """A refusal without its location; :func:`_blame` adds the part and turns it into a ProxyError."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


@contextlib.contextmanager
def _blame(where: str) -> Iterator[None]:
    try:
        yield
    except _Bad as exc:
        cls = PayloadTooLarge if exc.too_large else InvalidRequest
        raise cls(f"image_url in {where}: {exc.reason}", param=f"{where}.image_url") from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _open(data: bytes, what: str) -> Image.Image:
    """Pillow's lazy open: it reads the header (format, mode, size), no pixels."""
    try:
        return Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _Bad(f"{what} is too large in pixels ({exc})") from None
    except UnidentifiedImageError:
        raise _Bad(
            f"{what} is not a valid image (unrecognised format; send JPEG, PNG, WebP, GIF, BMP or TIFF)"
        ) from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise _Bad(f"{what} is not a valid image ({exc})") from None


def _check_size(img: Image.Image, policy: ImagePolicy, what: str) -> bool:
    """Refuses an image over max_pixels; returns whether it will be downscaled. For a JPEG that will be,
    it also sets libjpeg's reduced-scale decode (1/2 to 1/8), so ``img.size`` becomes what is decoded."""
    width, height = img.size
    if width * height > policy.max_pixels:
        raise _Bad(f"{what} is {width}x{height} pixels, more than the {policy.max_pixels} allowed")
    downscale = policy.max_dimension > 0 and max(width, height) > policy.max_dimension
    if downscale and img.format in ("JPEG", "MPO"):
        img.draft("RGB", _target(img.size, policy.max_dimension))  # never below the target size
    return downscale


def _target(size: tuple[int, int], max_dimension: int) -> tuple[int, int]:
    """The size a downscaled image gets: its longer side max_dimension, aspect kept."""
    scale = max_dimension / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _reduce_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The integer box reduction applied before Lanczos, leaving at least twice the target (as Pillow's
    ``reducing_gap=2``), so the filter still sees enough pixels to avoid aliasing."""
    return max(1, min(size[0] // target[0], size[1] // target[1]) // 2)


@dataclass(frozen=True)
class Probe:
    """What an image's header says, before any pixel is decoded."""

    format: str
    size: tuple[int, int]  # as the file declares it
    decoded_pixels: int  # what the decoder will produce (less for a JPEG decoded at reduced scale)
    decode_bytes: int  # estimated peak memory of normalize_image for it


def probe_image(data: bytes, policy: ImagePolicy, what: str = "the image") -> Probe:
    """Reads the header only, so the request's totals and the decode budget are known before decoding."""
    with _open(data, what) as img:
        size, fmt = img.size, img.format or ""
        downscale = _check_size(img, policy, what)
        decoded = img.size  # after draft(): what libjpeg will actually produce
        cost = _decode_bytes(fmt, img.mode, decoded, policy.max_dimension if downscale else 0)
        return Probe(fmt, size, decoded[0] * decoded[1], cost)


def _decode_bytes(fmt: str, mode: str, decoded: tuple[int, int], max_dimension: int) -> int:
    """Upper estimate of normalize_image's peak memory: the decoded frame, plus, when downscaling, two
    4-byte copies of one strip and the box-reduced image (see shrink), or else a full-size RGB(A)
    copy; plus a fixed overhead."""
    pixels = decoded[0] * decoded[1]
    frame = pixels * FORMAT_BYTES_PER_PIXEL.get(fmt, FRAME_BYTES_PER_PIXEL.get(mode, 4))
    if not max_dimension:
        return DECODE_OVERHEAD_BYTES + frame + pixels * 4
    factor = _reduce_factor(decoded, _target(decoded, max_dimension))
    strip = min(pixels, decoded[0] * factor * max(1, SHRINK_STRIP_PIXELS // (decoded[0] * factor)))
    reduced = -(-decoded[0] // factor) * -(-decoded[1] // factor)
    return DECODE_OVERHEAD_BYTES + frame + strip * 8 + reduced * 4


# EXIF orientation -> the transposition that undoes it (EXIF 2.3, tag 0x0112), as ImageOps.exif_transpose.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def shrink(img: Image.Image, max_dimension: int, alpha: bool) -> Image.Image:
    """Downscale to fit max_dimension (aspect kept), in RGB or RGBA, holding beside the decoded image
    only one strip and the box-reduced image (a quarter of it or less, once it is 4x the target).

    Pillow's ``thumbnail``/``resize`` would first convert the *whole* image (RGBA to premultiplied
    RGBa, palette to RGB), doubling or quintupling the peak of a large image. Here each strip of rows is
    converted and box-reduced by an integer factor on its own (exact: strips are a multiple of the factor
    high, so no box straddles two), and only the reduced image, still at least twice the target, gets
    the Lanczos filter.
    """
    width, height = img.size
    target = _target(img.size, max_dimension)
    factor = _reduce_factor(img.size, target)
    work = "RGBa" if alpha else "RGB"  # premultiplied alpha, so transparent pixels do not bleed colour
    if factor == 1 and img.mode == work:
        return img.resize(target, Image.Resampling.LANCZOS)  # nothing to convert or reduce: no copy
    reduced = Image.new(work, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, SHRINK_STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = img.crop((0, top, width, min(height, top + rows)))
        strip = strip.convert("RGBA").convert("RGBa") if alpha else strip.convert("RGB")
        if factor > 1:
            strip = strip.reduce(factor)
        reduced.paste(strip, (0, top // factor))
        del strip
    out = reduced.resize(target, Image.Resampling.LANCZOS)
    return out.convert("RGBA") if alpha else out


def normalize_image(data: bytes, policy: ImagePolicy, what: str = "the image") -> tuple[str, bytes | None]:
    """Check that ``data`` is a real image and make it something Ollama takes.

    Returns ``(mime, new_bytes)``; ``new_bytes`` is None when the original bytes can go unchanged.
    Raises :class:`_Bad` naming ``what`` when the bytes are not a usable image. Its peak memory, which
    :func:`probe_image` estimates, is the decoded frame plus what :func:`shrink` holds.
    """
    with _open(data, what) as probe:
        try:
            probe.verify()  # structural checks (PNG CRCs, ...) without decoding
        except Exception as exc:
            raise _Bad(f"{what} is not a valid image ({exc})") from None
    img = _open(data, what)  # verify() leaves the image unusable

    with img:
        fmt = img.format or ""
        downscale = _check_size(img, policy, what)
        animated_webp = fmt == "WEBP" and getattr(img, "is_animated", False)
        try:
            img.load()  # decode the first frame fully: truncated or corrupt data fails here
        except Exception as exc:
            raise _Bad(f"{what} is not a valid image ({exc})") from None

        if fmt in OLLAMA_MIME and not downscale and not animated_webp:
            return OLLAMA_MIME[fmt], None

        try:
            # Re-encoding drops EXIF, so its rotation is applied; after shrinking, where it is cheap.
            turn = _ORIENTATION.get(img.getexif().get(0x0112))
            alpha = _has_alpha(img)
            if downscale:
                out = shrink(img, policy.max_dimension, alpha)
            else:
                out = img.convert("RGBA" if alpha else "RGB")
            img.close()  # the full-size frame is no longer needed: free it before encoding
            if turn is not None:
                out = out.transpose(turn)
            buf = io.BytesIO()
            if downscale and not alpha:
                out.save(buf, "JPEG", quality=90)
                return "image/jpeg", buf.getvalue()
            out.save(buf, "PNG")
            return "image/png", buf.getvalue()
        except Exception as exc:
            raise _Bad(f"{what} could not be converted ({exc})") from None


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _show(url: Any) -> str:
    text = str(url)
    return text if len(text) <= URL_SHOWN_CHARS else text[: URL_SHOWN_CHARS - 3] + "..."


# --------------------------------------------------------------------------------------------------
# The inliner


@dataclass
class _Part:
    where: str  # "messages[0].content[1]"
    holder: dict  # the dict whose ``key`` holds the URL
    key: str
    url: str


ImagePart = _Part  # for dialects that find their images themselves (ImageInliner.inline's parts)


def image_parts(messages: Any) -> list[_Part]:
    parts: list[_Part] = []
    if not isinstance(messages, list):
        return parts
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            where = f"messages[{i}].content[{j}]"
            value = part.get("image_url")
            if isinstance(value, str):
                parts.append(_Part(where, part, "image_url", value))
            elif isinstance(value, dict) and isinstance(value.get("url"), str):
                parts.append(_Part(where, value, "url", value["url"]))
            else:
                raise InvalidRequest(
                    f'image_url in {where}: expected {{"url": "..."}} or a URL string',
                    param=f"{where}.image_url",
                )
    return parts


@dataclass
class _Loaded:
    """An image part whose bytes are in hand and whose header has been read."""

    part: _Part
    data: bytes
    what: str  # how messages name it: "the data URL" or the (shortened) URL
    as_sent: str | None  # for a data URL that may go unchanged: the MIME type its prefix tells Ollama
    probe: Probe


class DecodeBudget:
    """Estimated bytes of image decoding in progress in this process, capped at ``capacity``.

    A decode waits until its estimate fits, first come first served (a large image is not overtaken
    forever by small ones), so N concurrent requests cannot add their images' memory up. The caller
    checks that an estimate fits the capacity at all before waiting.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, n: int) -> None:
        if not self._waiters and self.in_use + n <= self.capacity:
            self.in_use += n
            return
        waiter = (n, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        except BaseException:  # cancelled or timed out
            if waiter[1].done() and not waiter[1].cancelled():
                self.release(n)  # granted just as it was cancelled: give it back
            else:
                self._waiters.remove(waiter)
                self._grant()  # it may have blocked smaller ones behind it
            raise

    def release(self, n: int) -> None:
        self.in_use -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            n, future = self._waiters.popleft()
            if not future.done():
                self.in_use += n
                future.set_result(None)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS): returns freed heap pages to the OS."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


malloc_trim = _find_malloc_trim()


def _decode_and_trim(data: bytes, policy: ImagePolicy, what: str) -> tuple[str, bytes | None]:
    """normalize_image, then hand freed memory back to the OS before the budget counts it free.

    Pillow frees a large image's 16 MiB blocks at once (its block cache is off: blocks_max 0), but
    glibc keeps them in the decoding thread's heap, where another thread cannot reuse them: without
    this, RSS grew to the sum of several decodes and stayed there (measured, docs/DESIGN.md).
    """
    try:
        return normalize_image(data, policy, what)
    finally:
        if malloc_trim is not None:
            malloc_trim(0)


class ImageInliner:
    """Rewrites a request's image parts into data URLs Ollama accepts. One per application; its HTTP
    session (connection pool) is created on first use and closed by :meth:`close`."""

    def __init__(
        self,
        policy: ImagePolicy,
        resolver: Resolver | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``resolver`` defaults to the system's getaddrinfo; ``ssl_context`` to the system trust store
        with hostname checks (pass one to trust a private CA, as the tests do)."""
        self.policy = policy
        self.resolver = resolver or system_resolve
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
        self.decode_budget = DecodeBudget(policy.decode_memory_bytes)
        # Large decodes get threads of their own, so they never queue DNS lookups or token counting
        # behind them on the loop's default executor.
        self._decoder = concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="proxyd-decode")
        _parse_networks(policy.deny_networks)  # bad CIDRs fail at startup, not on the first request
        _parse_endpoints(policy.deny_endpoints)

    async def inline(self, messages: list, parts: list[ImagePart] | None = None) -> int:
        """Validates every image part; replaces each http(s) URL and each non-Ollama format by a data
        URL Ollama accepts, in place. Returns the number of images. Raises InvalidRequest/PayloadTooLarge.
        ``parts``: the image slots a dialect found itself (the native API's base64 strings), instead
        of the image_url parts of ``messages``.

        Nothing is changed unless every image succeeds.
        """
        if parts is None:
            parts = image_parts(messages)
        if not parts:
            return 0
        if len(parts) > self.policy.max_images:
            raise InvalidRequest(
                f"too many images: {len(parts)} image_url parts, "
                f"at most {self.policy.max_images} per request",
                param="messages",
            )
        # Cheap checks first, in order, so the same request always fails the same way.
        for part in parts:
            with _blame(part.where):
                if not _is_data_url(part.url):
                    self._check_url(part.url)
        # Every image's bytes and header first (fetches side by side), so the request's total is known
        # before a single pixel is decoded; then the decodes, each holding room in the process budget.
        loaded = await _all_or_nothing([self._load(part) for part in parts])
        total = sum(image.probe.decoded_pixels for image in loaded)
        if total > self.policy.max_pixels_per_request:
            raise InvalidRequest(
                f"the images in this request decode to {total} pixels in total, more than the "
                f"{self.policy.max_pixels_per_request} allowed per request",
                param="messages",
            )
        urls = await _all_or_nothing([self._finish(image) for image in loaded])
        for part, url in zip(parts, urls):
            part.holder[part.key] = url
        return len(parts)

    async def close(self) -> None:
        self._decoder.shutdown(wait=False)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- one part

    async def _load(self, part: _Part) -> _Loaded:
        """The image's bytes (decoded from its data URL, or fetched) and its header; no pixel decoded."""
        with _blame(part.where):
            if _is_data_url(part.url):
                data, as_sent = self._from_data_url(part.url)
                what = "the data URL"
            else:
                data, as_sent, what = await self._fetch(part.url), None, _show(part.url)
            return _Loaded(part, data, what, as_sent, probe_image(data, self.policy, what))

    async def _finish(self, image: _Loaded) -> str:
        with _blame(image.part.where):
            mime, new = await self._normalize(image)
            if new is None and image.as_sent == mime:
                return image.part.url  # already what Ollama wants: forward the very same string
            return _data_url(mime, new if new is not None else image.data)

    def _from_data_url(self, url: str) -> tuple[bytes, str | None]:
        """The payload's bytes, and the MIME type Ollama will read from the URL if it may go unchanged."""
        head, comma, payload = url.partition(",")
        if not comma:
            raise _Bad("the data URL has no ',' before its payload")
        params = [p.strip().lower() for p in head[len("data:") :].split(";")]
        mime = params[0]
        if "base64" not in params[1:]:
            raise _Bad("the data URL is not base64-encoded (expected data:image/png;base64,...)")
        if mime and not mime.startswith("image/"):
            raise _Bad(f"the data URL has media type {mime!r}, not an image")
        clean = "".join(payload.split()) if any(c.isspace() for c in payload) else payload
        if len(clean) // 4 * 3 > self.policy.max_bytes + 2:
            raise _Bad(self._too_large_message(), too_large=True)
        try:
            data = base64.b64decode(clean, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _Bad(f"the data URL's payload is not valid base64 ({exc})") from None
        if len(data) > self.policy.max_bytes:
            raise _Bad(self._too_large_message(), too_large=True)
        return data, OLLAMA_PREFIXES.get(head + ",") if clean is payload else None

    async def _normalize(self, image: _Loaded) -> tuple[str, bytes | None]:
        """normalize_image under the decode budget: on the loop for small images, else in a thread."""
        probe, policy = image.probe, self.policy
        cost = probe.decode_bytes
        if cost > self.decode_budget.capacity:
            width, height = probe.size
            raise _Bad(
                f"{image.what} ({width}x{height} {probe.format}) would take about {cost >> 20} MiB to decode, "
                f"more than the {self.decode_budget.capacity >> 20} MiB allowed"
            )
        try:
            async with asyncio.timeout(policy.decode_wait_s):
                await self.decode_budget.acquire(cost)
        except TimeoutError:
            raise ServiceUnavailable(
                "proxyd is busy decoding other images; retry shortly", headers={"Retry-After": "1"}
            ) from None
        if len(image.data) <= THREAD_BYTES and probe.decoded_pixels <= THREAD_PIXELS:
            try:
                return normalize_image(image.data, policy, image.what)
            finally:
                self.decode_budget.release(cost)
        loop = asyncio.get_running_loop()
        decode = loop.run_in_executor(self._decoder, _decode_and_trim, image.data, policy, image.what)
        # The room is given back when the thread ends, not when this request stops waiting for it
        # (a cancelled request's decode still runs to the end, and still uses its memory).
        decode.add_done_callback(lambda done: self._decoded(done, cost))
        return await asyncio.shield(decode)

    def _decoded(self, done: asyncio.Future, cost: int) -> None:
        if not done.cancelled():
            done.exception()  # retrieved, so a cancelled request's failure is not logged as unhandled
        self.decode_budget.release(cost)

    def _too_large_message(self) -> str:
        return f"the image is larger than {self.policy.max_bytes} bytes"

    # ---- fetching

    def _check_url(self, url: str | yarl.URL, verb: str = "fetch") -> yarl.URL:
        """Scheme, credentials, port and literal-IP checks; raises _Bad. Names are checked at resolve
        time by _CheckingResolver, on the very addresses aiohttp will connect to."""
        try:
            parsed = url if isinstance(url, yarl.URL) else yarl.URL(url)
            scheme, host, port = parsed.scheme.lower(), parsed.host, parsed.port
        except (ValueError, TypeError, UnicodeError) as exc:
            raise _Bad(f"{_show(url)} is not a valid URL ({exc})") from None
        refuse = f"refusing to {verb} {_show(url)}"
        if scheme not in ("http", "https"):
            if not scheme:
                raise _Bad(f"{refuse}: not an absolute URL (only http, https and data URLs are accepted)")
            raise _Bad(f"{refuse}: scheme '{scheme}' is not allowed (only http and https)")
        if parsed.user is not None or parsed.password is not None:
            raise _Bad(f"{refuse}: URLs with credentials (user:password@) are not fetched")
        if not host:
            raise _Bad(f"{refuse}: the URL has no host")
        if not self.policy.allow_private_networks and port not in self.policy.allowed_ports:
            allowed = ", ".join(str(p) for p in self.policy.allowed_ports)
            raise _Bad(f"{refuse}: port {port} is not allowed (allowed: {allowed})")
        ip = literal_ip(host)
        if ip is not None:
            why = refusal_reason(ip, self.policy, port)
            shown = f"address {ip}" if str(ip) == host else f"address {host} (= {ip})"
            if why is not None:
                raise _Bad(f"{refuse}: {shown} is {why}")
            if ip.version == 4 and str(ip) != host:
                # aiohttp refuses these too; say it plainly.
                raise _Bad(f"{refuse}: {shown} is not a dotted-quad IPv4 address")
        return parsed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=_CheckingResolver(self.policy, self.resolver),
                use_dns_cache=False,  # every request goes through the check
                ssl=self._ssl,  # certificates verified against the URL's hostname, not the IP
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # never store or send cookies
                trust_env=False,  # no proxies or .netrc credentials from the environment
                auto_decompress=False,  # we ask for identity; a gzip body then fails to decode
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self.policy.connect_timeout_s
                ),  # the total is enforced around the whole redirect chain in _fetch
                headers={
                    "User-Agent": USER_AGENT,
                    "Accept": "image/jpeg, image/png, image/webp, image/gif;q=0.8, image/*;q=0.5",
                    "Accept-Encoding": "identity",
                },
            )
        return self._session

    async def _fetch(self, url: str) -> bytes:
        """GET ``url``, following at most max_redirects redirects by hand, each hop checked like the
        first; the whole chain, body included, gets timeout_s."""
        policy = self.policy
        current = self._check_url(url)
        try:
            async with asyncio.timeout(policy.timeout_s):
                for _hop in range(policy.max_redirects + 1):
                    result = await self._get_once(current)
                    if isinstance(result, bytes):
                        return result
                    verb = f"follow the redirect from {_show(current)} to"
                    log.debug("image fetch: %s redirects to %s", current, result)
                    current = self._check_url(result, verb=verb)
                raise _Bad(f"too many redirects fetching {_show(url)} (more than {policy.max_redirects})")
        except TimeoutError:
            raise _Bad(f"timed out fetching {_show(url)} (limit {policy.timeout_s:g}s)") from None

    async def _get_once(self, url: yarl.URL) -> bytes | yarl.URL:
        """One request: the image's bytes, or the (unchecked) URL a redirect points to."""
        try:
            async with self._get_session().get(url, allow_redirects=False) as resp:
                if resp.status not in REDIRECT_STATUSES:
                    return await self._read_image(resp, url)
                location = resp.headers.get("Location")
                if not location:
                    raise _Bad(f"{_show(url)} answered HTTP {resp.status} without a Location")
                try:
                    return url.join(yarl.URL(location))
                except (ValueError, TypeError) as exc:
                    raise _Bad(f"{_show(url)} redirected to an invalid URL ({exc})") from None
        except aiohttp.ClientConnectorError as exc:
            raise self._connect_error(exc, url) from None
        except aiohttp.ClientError as exc:
            if isinstance(exc, asyncio.TimeoutError):  # aiohttp's connect timeout: reported by _fetch
                raise
            raise _Bad(f"fetching {_show(url)} failed ({type(exc).__name__}: {exc})") from None

    def _connect_error(self, exc: aiohttp.ClientConnectorError, url: yarl.URL) -> _Bad:
        cause: BaseException | None = exc
        for _depth in range(8):  # the resolver's own errors arrive wrapped in ClientConnectorDNSError
            if cause is None:
                break
            if isinstance(cause, AddressRefused):
                return _Bad(f"refusing to fetch {_show(url)}: {cause}")
            if isinstance(cause, HostNotFound):
                return _Bad(f"cannot fetch {_show(url)}: {cause}")
            cause = cause.__cause__ or cause.__context__
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return _Bad(f"cannot fetch {_show(url)}: TLS certificate check failed ({exc.certificate_error})")
        return _Bad(f"could not connect to fetch {_show(url)} ({exc.os_error.strerror or exc.os_error})")

    async def _read_image(self, resp: aiohttp.ClientResponse, url: yarl.URL) -> bytes:
        if not 200 <= resp.status < 300:
            status = f"{resp.status} {resp.reason or ''}".rstrip()
            raise _Bad(f"fetching {_show(url)} returned HTTP {status} (expected 2xx)")
        if "Content-Type" not in resp.headers:
            raise _Bad(f"{_show(url)} returned no content type (expected image/*)")
        if not resp.content_type.startswith("image/"):
            raise _Bad(f"{_show(url)} returned content type {resp.content_type}, not an image")
        limit = self.policy.max_bytes
        too_large = _Bad(f"{_show(url)} is larger than {limit} bytes", too_large=True)
        if resp.content_length is not None and resp.content_length > limit:
            raise too_large
        body = bytearray()
        async for chunk in resp.content.iter_chunked(READ_CHUNK):
            body += chunk
            if len(body) > limit:
                resp.close()  # drop the connection rather than drain an unbounded body
                raise too_large
        return bytes(body)


def _is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


async def _all_or_nothing(coros: list[Awaitable[str]]) -> list[str]:
    """Run concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
