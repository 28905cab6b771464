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
import contextlib
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
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidRequest, PayloadTooLarge

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
    deny_networks: tuple[str, ...] = ()  # CIDRs refused always, even with allow_private_networks


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


def refusal_reason(address: str | IPAddress, policy: ImagePolicy) -> str | None:
    """Why proxyd must not connect to ``address`` under ``policy``; None when it may.

    IPv4 embedded in IPv6 (IPv4-mapped, NAT64 64:ff9b::/96, 6to4 2002::/16) is unwrapped and judged by
    the IPv4 address, because Python 3.11's ``is_global`` is wrong for NAT64, 6to4 and 224.0.0.1
    (anchors D.2). Operator ``deny_networks`` apply last and always, even with allow_private_networks.
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
    return None


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
        why = refusal_reason(ip, policy)
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
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await resolve_checked(host, port, self._policy, self._resolver)
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


def normalize_image(data: bytes, policy: ImagePolicy, what: str = "the image") -> tuple[str, bytes | None]:
    """Check that ``data`` is a real image and make it something Ollama takes.

    Returns ``(mime, new_bytes)``; ``new_bytes`` is None when the original bytes can go unchanged.
    Raises :class:`_Bad` naming ``what`` when the bytes are not a usable image.
    """
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as probe:
            probe.verify()  # structural checks (PNG CRCs, ...) without decoding
        img = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)  # verify() leaves the image unusable
    except Image.DecompressionBombError as exc:
        raise _Bad(f"{what} is too large in pixels ({exc})") from None
    except UnidentifiedImageError:
        raise _Bad(
            f"{what} is not a valid image (unrecognised format; send JPEG, PNG, WebP, GIF, BMP or TIFF)"
        ) from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise _Bad(f"{what} is not a valid image ({exc})") from None

    with img:
        width, height = img.size
        if width * height > policy.max_pixels:
            raise _Bad(f"{what} is {width}x{height} pixels, more than the {policy.max_pixels} allowed")
        fmt = img.format or ""
        downscale = policy.max_dimension > 0 and max(width, height) > policy.max_dimension
        animated_webp = fmt == "WEBP" and getattr(img, "is_animated", False)
        try:
            if downscale and fmt in ("JPEG", "MPO"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: faster and far less memory.
                img.draft("RGB", (policy.max_dimension, policy.max_dimension))
            img.load()  # decode the first frame fully: truncated or corrupt data fails here
        except Exception as exc:
            raise _Bad(f"{what} is not a valid image ({exc})") from None

        if fmt in OLLAMA_MIME and not downscale and not animated_webp:
            return OLLAMA_MIME[fmt], None

        try:
            out = ImageOps.exif_transpose(img)  # re-encoding drops EXIF, so apply its rotation first
            alpha = _has_alpha(out)
            out = out.convert("RGBA" if alpha else "RGB")
            if downscale:
                out.thumbnail((policy.max_dimension, policy.max_dimension), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if downscale and not alpha:
                out.save(buf, "JPEG", quality=90)
                return "image/jpeg", buf.getvalue()
            out.save(buf, "PNG")
            return "image/png", buf.getvalue()
        except Exception as exc:
            raise _Bad(f"{what} could not be converted ({exc})") from None


def _needs_thread(data: bytes) -> bool:
    """Big files, or small files that decode to many pixels (a compressed PNG can be tiny)."""
    if len(data) > THREAD_BYTES:
        return True
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as probe:  # reads the header only
            return probe.size[0] * probe.size[1] > THREAD_PIXELS
    except Exception:
        return False  # normalize_image will report it, cheaply


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


def _image_parts(messages: Any) -> list[_Part]:
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
        self._resolver = resolver or system_resolve
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._session: aiohttp.ClientSession | None = None
        _parse_networks(policy.deny_networks)  # bad CIDRs fail at startup, not on the first request

    async def inline(self, messages: list) -> int:
        """Validates every image part; replaces each http(s) URL and each non-Ollama format by a data
        URL Ollama accepts, in place. Returns the number of images. Raises InvalidRequest/PayloadTooLarge.

        Nothing is changed unless every image succeeds.
        """
        parts = _image_parts(messages)
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
        urls = await _all_or_nothing([self._inline_one(part) for part in parts])
        for part, url in zip(parts, urls):
            part.holder[part.key] = url
        return len(parts)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- one part

    async def _inline_one(self, part: _Part) -> str:
        with _blame(part.where):
            if _is_data_url(part.url):
                return await self._from_data_url(part.url)
            data = await self._fetch(part.url)
            mime, new = await self._normalize(data, _show(part.url))
            return _data_url(mime, new if new is not None else data)

    async def _from_data_url(self, url: str) -> str:
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
        out_mime, new = await self._normalize(data, "the data URL")
        if new is None and clean is payload and OLLAMA_PREFIXES.get(head + ",") == out_mime:
            return url  # already what Ollama wants: forward the very same string
        return _data_url(out_mime, new if new is not None else data)

    async def _normalize(self, data: bytes, what: str) -> tuple[str, bytes | None]:
        if _needs_thread(data):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, normalize_image, data, self.policy, what)
        return normalize_image(data, self.policy, what)

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
            why = refusal_reason(ip, self.policy)
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
                resolver=_CheckingResolver(self.policy, self._resolver),
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
