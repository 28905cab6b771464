"""proxyd.images: data URL checks and conversion, SSRF-safe fetching, the address classifier.

No traffic leaves the machine: fetches go to a tornado server on 127.0.0.1 (allowed only with
allow_private_networks=True), and every refusal below happens before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import proxyd.images as images
from proxyd.errors import InvalidRequest, PayloadTooLarge
from proxyd.images import (
    AddressRefused,
    ImageInliner,
    ImagePolicy,
    literal_ip,
    normalize_image,
    refusal_reason,
    resolve_checked,
    system_resolve,
)
from tests.fixtures_images import (
    GIF,
    PNG,
    data_url,
    decode_data_url,
    image_message,
    image_server,
    make_bomb,
    make_image,
    make_noise_png,
    make_tls_files,
    pixels,
)

LOCAL = ImagePolicy(allow_private_networks=True, timeout_s=2.0)


def run(coro):
    return asyncio.run(coro)


async def inline(messages, policy=ImagePolicy(), resolver=None) -> int:
    inliner = ImageInliner(policy, resolver=resolver)
    try:
        return await inliner.inline(messages)
    finally:
        await inliner.close()


def inline_sync(messages, policy=ImagePolicy(), resolver=None) -> int:
    return run(inline(messages, policy, resolver))


def first_url(messages) -> str:
    return messages[0]["content"][0]["image_url"]["url"]


def refused(url, policy=ImagePolicy(), resolver=None) -> InvalidRequest:
    messages = image_message(url)
    before = copy.deepcopy(messages)
    with pytest.raises(InvalidRequest) as info:
        inline_sync(messages, policy, resolver)
    assert messages == before  # nothing rewritten when a request is refused
    return info.value


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no lookup expected, got {host}")


# ---------------------------------------------------------------------------------------------
# data URLs


def test_no_images_is_a_no_op():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
    ]
    assert inline_sync(messages) == 0


@pytest.mark.parametrize(
    "fmt,mime",
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("JPEG", "image/jpg"), ("WEBP", "image/webp")],
)
def test_ollama_formats_pass_through_unchanged(fmt, mime):
    url = data_url(make_image(fmt), mime)
    messages = image_message(url)
    assert inline_sync(messages) == 1
    assert first_url(messages) is url


def test_shorthand_string_form_is_handled_in_place():
    url = data_url(GIF, "image/gif")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": url}]}]
    assert inline_sync(messages) == 1
    assert messages[0]["content"][0]["image_url"].startswith("data:image/png;base64,")


def test_detail_is_kept():
    part = {"type": "image_url", "image_url": {"url": data_url(GIF), "detail": "low"}}
    messages = [{"role": "user", "content": [part]}]
    inline_sync(messages)
    assert messages[0]["content"][0]["image_url"]["detail"] == "low"


@pytest.mark.parametrize("fmt,mime", [("GIF", "image/gif"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")])
def test_other_formats_become_png_with_the_same_pixels(fmt, mime):
    source = make_image(fmt)
    messages = image_message(data_url(source, mime))
    inline_sync(messages)
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/png;base64"
    assert pixels(img) == pixels(Image.open(io.BytesIO(source)))


def test_wrong_or_blank_mime_gets_the_real_one_without_reencoding():
    jpeg = make_image("JPEG")
    blank = "data:;base64," + base64.b64encode(jpeg).decode()
    for url in (data_url(jpeg, "image/png"), blank, data_url(jpeg, "IMAGE/JPEG")):
        messages = image_message(url)
        inline_sync(messages)
        assert first_url(messages) == data_url(jpeg, "image/jpeg")


def test_whitespace_in_base64_is_removed():
    b64 = base64.b64encode(PNG).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    messages = image_message("data:image/png;base64," + wrapped)
    inline_sync(messages)
    assert first_url(messages) == data_url(PNG)


@pytest.mark.parametrize(
    "url,words",
    [
        (data_url(PNG[:40] + b"\x00" * 100), "is not a valid image"),
        (data_url(b"hello, this is text"), "is not a valid image"),
        (data_url(make_image("JPEG", (200, 200))[:600], "image/jpeg"), "is not a valid image"),
        ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # bad padding
        ("data:image/png," + "%89PNG", "not base64-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png;base64", "no ','"),
    ],
)
def test_bad_data_urls_are_400(url, words):
    err = refused(url)
    assert type(err) is InvalidRequest and err.status == 400
    assert words in err.message
    assert err.message.startswith("image_url in messages[0].content[0]: ")
    assert err.param == "messages[0].content[0].image_url"


def test_oversize_data_url_is_413():
    policy = ImagePolicy(max_bytes=1000)
    err = refused(data_url(make_noise_png((40, 40))), policy)
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert "larger than 1000 bytes" in err.message


def test_pixel_bomb_is_400():
    bomb = make_image("PNG", (3000, 3000), mode="L")  # a few KiB that decode to 9 megapixels
    assert len(bomb) < 50_000
    err = refused(data_url(bomb), ImagePolicy(max_pixels=4_000_000))
    assert "3000x3000 pixels" in err.message and err.status == 400


def test_large_photo_is_downscaled_to_jpeg_keeping_aspect():
    messages = image_message(data_url(make_image("PNG", (2048, 1024))))
    inline_sync(messages)
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/jpeg;base64" and img.size == (1024, 512)


def test_large_image_with_alpha_is_downscaled_to_png():
    messages = image_message(data_url(make_image("PNG", (600, 1200), mode="RGBA")))
    inline_sync(messages, ImagePolicy(max_dimension=300))
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/png;base64" and img.size == (150, 300) and img.mode == "RGBA"


def test_max_dimension_zero_never_downscales():
    url = data_url(make_image("PNG", (1500, 20)))
    messages = image_message(url)
    inline_sync(messages, ImagePolicy(max_dimension=0))
    assert first_url(messages) is url


def test_big_image_is_decoded_in_a_thread(monkeypatch):
    seen = []
    real = images.normalize_image

    def spy(*args):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(images, "normalize_image", spy)
    big = make_noise_png((400, 400))  # ~480 KB
    assert len(big) > images.THREAD_BYTES
    inline_sync(image_message(data_url(big), data_url(PNG)))
    assert sorted(seen) == [False, True]  # the big one off the loop thread, the small one inline


def test_too_many_images():
    err = refused(data_url(PNG), ImagePolicy(max_images=0))
    assert "too many images" in err.message and err.param == "messages"
    messages = image_message(*[data_url(PNG)] * 3)
    with pytest.raises(InvalidRequest, match="too many images: 3"):
        inline_sync(messages, ImagePolicy(max_images=2))


def test_malformed_image_url_part():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"nope": 1}}]}]
    with pytest.raises(InvalidRequest) as info:
        inline_sync(messages)
    assert info.value.param == "messages[0].content[0].image_url"


def test_normalize_image_reports_format():
    assert normalize_image(PNG, ImagePolicy()) == ("image/png", None)
    mime, data = normalize_image(GIF, ImagePolicy())
    assert mime == "image/png" and data.startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# fetching from the local server (allow_private_networks=True)


def test_fetch_png_arrives_as_data_url_with_the_same_pixels():
    async def go():
        async with image_server() as srv:
            messages = image_message(srv.url("/png"), srv.url("/gif"))
            assert await inline(messages, LOCAL) == 2
            return messages, srv

    messages, srv = run(go())
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/png;base64"
    assert first_url(messages) == data_url(PNG)  # PNG bytes forwarded as they came
    assert messages[0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    # What the remote server saw: our agent, no cookies or credentials, no compression.
    h = srv.headers[0]
    assert h["User-Agent"] == "proxyd-image-fetch"
    assert "Cookie" not in h and "Authorization" not in h
    assert h.get("Accept-Encoding") == "identity"


def test_redirects_are_followed_and_cookies_not_kept():
    async def go():
        async with image_server() as srv:
            messages = image_message(srv.url("/redirect/png"), srv.url("/redirect/rel"))
            await inline(messages, LOCAL)
            return messages, srv

    messages, srv = run(go())
    assert first_url(messages) == data_url(PNG)
    # "/redirect/rel" says Location: png, resolved against the current URL to /redirect/png.
    assert sorted(srv.hits) == ["/png", "/png", "/redirect/png", "/redirect/png", "/redirect/rel"]
    assert all("Cookie" not in h for h in srv.headers)


def test_redirect_target_is_checked_again():
    policy = ImagePolicy(allow_private_networks=True, deny_networks=("10.0.0.0/8",), timeout_s=2.0)

    async def go():
        async with image_server() as srv:
            with pytest.raises(InvalidRequest) as info:
                await inline(image_message(srv.url("/redirect/private")), policy)
            return info.value, srv

    err, srv = run(go())
    assert srv.hits == ["/redirect/private"]
    assert "refusing to follow the redirect from" in err.message
    assert err.message.endswith(
        "to http://10.0.0.1/x: address 10.0.0.1 is denied by configuration (deny_networks 10.0.0.0/8)"
    )


def test_too_many_redirects():
    async def go():
        async with image_server() as srv:
            with pytest.raises(InvalidRequest, match=r"too many redirects .*more than 3"):
                await inline(image_message(srv.url("/redirect/loop")), LOCAL)
            return srv

    assert len(run(go()).hits) == 4  # the first request and three redirects


@pytest.mark.parametrize(
    "path,words",
    [
        ("/html", "returned content type text/html, not an image"),
        ("/missing", "returned HTTP 404 Not Found (expected 2xx)"),
        ("/corrupt", "/corrupt is not a valid image"),
    ],
)
def test_bad_responses_are_400(path, words):
    async def go():
        async with image_server() as srv:
            with pytest.raises(InvalidRequest) as info:
                await inline(image_message(srv.url(path)), LOCAL)
            return info.value

    err = run(go())
    assert type(err) is InvalidRequest and words in err.message


@pytest.mark.parametrize("path", ["/stream?kib=1024", "/big?bytes=200000"])
def test_oversize_body_is_413(path):
    policy = ImagePolicy(allow_private_networks=True, max_bytes=100_000, timeout_s=5.0)

    async def go():
        async with image_server() as srv:
            with pytest.raises(PayloadTooLarge) as info:
                await inline(image_message(srv.url(path)), policy)
            return info.value

    err = run(go())
    assert err.status == 413 and "larger than 100000 bytes" in err.message


def test_never_answering_server_times_out():
    policy = ImagePolicy(allow_private_networks=True, timeout_s=0.5)

    async def go():
        async with image_server() as srv:
            with pytest.raises(InvalidRequest) as info:
                await inline(image_message(srv.url("/hang")), policy)
            return info.value

    err = run(go())
    assert "timed out fetching" in err.message and err.status == 400
    assert err.message.endswith("(limit 0.5s)"), err.message  # the policy's timeout_s ended it


def test_connection_refused_is_400():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    err = refused(f"http://127.0.0.1:{port}/x.png", LOCAL)
    assert "could not connect" in err.message


def test_images_are_fetched_concurrently():
    async def go():
        async with image_server() as srv:
            # The gate answers only once all four requests wait at it: fetched one after another,
            # the first would time out.
            await inline(image_message(*[srv.url("/gate?n=4")] * 4), LOCAL)
            return srv.most_waiting

    assert run(go()) == 4  # four fetches, side by side


def test_one_failure_leaves_every_part_unchanged():
    async def go():
        async with image_server() as srv:
            messages = image_message(srv.url("/png"), srv.url("/html"))
            before = copy.deepcopy(messages)
            with pytest.raises(InvalidRequest) as info:
                await inline(messages, LOCAL)
            assert messages == before
            return info.value

    assert run(go()).param == "messages[0].content[1].image_url"


def test_a_name_connects_to_exactly_the_checked_address():
    calls = []

    async def resolver(host, port):
        calls.append((host, port))
        return ["127.0.0.1"]

    async def go(private_allowed):
        async with image_server() as srv:
            policy = ImagePolicy(
                allow_private_networks=private_allowed, allowed_ports=(srv.port,), timeout_s=2.0
            )
            messages = image_message(f"http://images.test:{srv.port}/png")
            try:
                await inline(messages, policy, resolver)
            except InvalidRequest as exc:
                return exc, srv
            return messages, srv

    # Allowed: the one lookup's answer is where the connection goes; the Host header keeps the name.
    messages, srv = run(go(True))
    assert first_url(messages) == data_url(PNG)
    assert calls == [("images.test", srv.port)]
    assert srv.headers[0]["Host"] == f"images.test:{srv.port}"

    # Refused: the same answer under a policy that refuses loopback; no connection is made.
    calls.clear()
    err, srv = run(go(False))
    assert err.message.endswith(
        f"refusing to fetch http://images.test:{srv.port}/png: "
        "images.test resolves to 127.0.0.1, which is loopback"
    )
    assert calls == [("images.test", srv.port)] and srv.hits == []


# ---------------------------------------------------------------------------------------------
# refusals under the default policy: all happen before any connection


@pytest.mark.parametrize(
    "url,words",
    [
        ("http://127.0.0.1/x.png", "address 127.0.0.1 is loopback"),
        ("http://127.0.0.1:8080/x.png", "port 8080 is not allowed (allowed: 80, 443)"),
        ("http://[::1]/", "address ::1 is loopback"),
        ("http://0.0.0.0/", "address 0.0.0.0 is unspecified"),
        ("http://[::]/", "address :: is unspecified"),
        ("http://10.1.2.3/", "address 10.1.2.3 is private"),
        ("http://172.16.5.4/", "address 172.16.5.4 is private"),
        ("http://192.168.1.1/", "address 192.168.1.1 is private"),
        ("http://169.254.169.254/latest/meta-data", "address 169.254.169.254 is link-local"),
        ("http://[fe80::1]/", "is link-local"),
        ("http://[fd00:ec2::254]/", "is unique-local"),
        ("http://[::ffff:127.0.0.1]/", "is loopback (IPv4-mapped form of 127.0.0.1)"),
        ("http://[::ffff:169.254.169.254]/", "is link-local (IPv4-mapped form of 169.254.169.254)"),
        ("http://[64:ff9b::a9fe:a9fe]/", "is link-local (NAT64 form of 169.254.169.254)"),
        ("http://[64:ff9b::10.0.0.1]/", "is private (NAT64 form of 10.0.0.1)"),
        ("http://[2002:a9fe:a9fe::1]/", "is link-local (6to4 form of 169.254.169.254)"),
        ("http://[2002:7f00:1::]/", "is loopback (6to4 form of 127.0.0.1)"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "Teredo"),
        ("http://100.64.0.1/", "shared address space (CGNAT"),
        ("http://100.100.100.200/", "shared address space (CGNAT"),
        ("http://224.0.0.1/", "address 224.0.0.1 is multicast"),
        ("http://[ff02::1]/", "is multicast"),
        ("http://255.255.255.255/", "is broadcast"),
        ("http://240.0.0.1/", "is reserved"),
        ("http://2130706433/", "address 2130706433 (= 127.0.0.1) is loopback"),
        ("http://0x7f.1/", "(= 127.0.0.1) is loopback"),
        ("http://127.1/", "(= 127.0.0.1) is loopback"),
        ("http://134744072/", "(= 8.8.8.8) is not a dotted-quad IPv4 address"),
        ("file:///etc/passwd", "scheme 'file' is not allowed (only http and https)"),
        ("ftp://x/y", "scheme 'ftp' is not allowed"),
        ("gopher://x:70/", "scheme 'gopher' is not allowed"),
        ("FILE:///etc/passwd", "scheme 'file' is not allowed"),
        ("/relative/path.png", "not an absolute URL"),
        ("http://user:pw@example.com/x.png", "credentials"),
        ("http:///x.png", "no host"),
    ],
)
def test_refusals(url, words):
    err = refused(url, resolver=no_dns)
    assert type(err) is InvalidRequest and err.status == 400
    assert words in err.message, err.message
    assert err.message.startswith("image_url in messages[0].content[0]: ")
    assert err.param == "messages[0].content[0].image_url"


def test_refusal_message_shape():
    err = refused("http://10.0.0.5/x.png", resolver=no_dns)
    assert err.message == (
        "image_url in messages[0].content[0]: "
        "refusing to fetch http://10.0.0.5/x.png: address 10.0.0.5 is private"
    )


def test_localhost_is_refused_after_resolution():
    async def resolver(host, port):  # what getaddrinfo answers for localhost; no DNS traffic in tests
        return {"localhost": ["::1", "127.0.0.1"]}[host]

    err = refused("http://localhost/x.png", resolver=resolver)
    assert err.message.endswith(
        "refusing to fetch http://localhost/x.png: localhost resolves to ::1, which is loopback"
    )


def test_system_resolver_returns_ip_strings():
    assert run(system_resolve("127.0.0.1", 80)) == ["127.0.0.1"]  # numeric: no lookup leaves the host


def test_any_private_answer_refuses_the_host():
    async def resolver(host, port):
        return ["93.184.216.34", "10.0.0.1"]  # a rebinding-style mixed answer

    err = refused("http://mixed.example/x.png", resolver=resolver)
    assert "mixed.example resolves to 10.0.0.1, which is private" in err.message


def test_unresolvable_host_is_400():
    async def resolver(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    err = refused("http://nowhere.example/x.png", resolver=resolver)
    assert "could not resolve host nowhere.example" in err.message


def test_public_name_passes_the_check_without_connecting():
    async def resolver(host, port):
        return {"public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}[host]

    addrs = run(resolve_checked("public.example", 443, ImagePolicy(), resolver))
    assert addrs == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]
    with pytest.raises(AddressRefused, match="denied by configuration"):
        run(resolve_checked("public.example", 443, ImagePolicy(deny_networks=("93.184.0.0/16",)), resolver))


def test_deny_networks_apply_even_with_private_allowed():
    policy = ImagePolicy(allow_private_networks=True, deny_networks=("127.0.0.0/8", "fd00::/8"))
    assert refusal_reason("127.0.0.1", policy).startswith("denied by configuration")
    assert refusal_reason("::ffff:127.0.0.1", policy).startswith("denied by configuration")
    assert refusal_reason("fd00::1", policy).startswith("denied by configuration")
    assert refusal_reason("10.0.0.1", policy) is None


def test_bad_deny_network_fails_at_construction():
    with pytest.raises(ValueError):
        ImageInliner(ImagePolicy(deny_networks=("not-a-cidr",)))


def test_literal_ip_forms():
    assert str(literal_ip("2130706433")) == "127.0.0.1"
    assert str(literal_ip("0x7f000001")) == "127.0.0.1"
    assert str(literal_ip("::ffff:7f00:1")) == "::ffff:7f00:1"
    assert literal_ip("example.com") is None
    assert literal_ip("1.2.3.4.5") is None


# ---------------------------------------------------------------------------------------------
# the address classifier, property-tested

DEFAULT = ImagePolicy()
NON_PUBLIC_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]  # fmt: skip
# IPv4-mapped forms are covered through embeddings() below.
NON_PUBLIC_V6 = ["::/127", "fc00::/7", "fe80::/10", "ff00::/8", "2001:db8::/32", "2001::/32", "100::/64"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]


def addresses_in(cidrs):
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return st.sampled_from(nets).flatmap(
        lambda n: st.integers(int(n.network_address), int(n.broadcast_address)).map(
            lambda i: ipaddress.ip_address(i) if n.version == 4 else ipaddress.IPv6Address(i)
        )
    )


def embeddings(v4: ipaddress.IPv4Address) -> list[ipaddress.IPv6Address]:
    n = int(v4)
    return [
        ipaddress.IPv6Address((0xFFFF << 32) | n),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address((0x0064FF9B << 96) | n),  # 64:ff9b::a.b.c.d
        ipaddress.IPv6Address((0x2002 << 112) | (n << 80)),  # 2002:aabb:ccdd::
    ]


@settings(max_examples=300, deadline=None)
@given(addresses_in(NON_PUBLIC_V4))
def test_non_public_ipv4_and_every_embedding_is_refused(ip):
    assert refusal_reason(ip, DEFAULT) is not None
    for wrapped in embeddings(ip):
        assert refusal_reason(wrapped, DEFAULT) is not None, wrapped


@settings(max_examples=200, deadline=None)
@given(addresses_in(NON_PUBLIC_V6))
def test_non_public_ipv6_is_refused(ip):
    assert refusal_reason(ip, DEFAULT) is not None


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_allowed_means_globally_routable(ip):
    """Whatever is allowed is global unicast, judged on the embedded IPv4 where there is one."""
    if refusal_reason(ip, DEFAULT) is None:
        target = ip
        if ip.version == 6:
            target = ip.ipv4_mapped or ip.sixtofour or target
            if ip in ipaddress.ip_network("64:ff9b::/96"):
                target = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        assert target.is_global and not target.is_multicast and not target.is_reserved
        assert not (target.version == 4 and target in ipaddress.ip_network("100.64.0.0/10"))


@settings(max_examples=200, deadline=None)
@given(addresses_in(["10.0.0.0/8", "fd00::/8"]), st.booleans())
def test_deny_networks_always_win(ip, allow_private):
    policy = ImagePolicy(allow_private_networks=allow_private, deny_networks=("10.0.0.0/8", "fd00::/8"))
    assert refusal_reason(ip, policy) is not None


@pytest.mark.parametrize("addr", PUBLIC)
def test_public_addresses_and_their_embeddings_are_allowed(addr):
    ip = ipaddress.ip_address(addr)
    assert refusal_reason(ip, DEFAULT) is None
    if ip.version == 4:
        for wrapped in embeddings(ip):
            assert refusal_reason(wrapped, DEFAULT) is None, wrapped


def test_allow_private_networks_allows_loopback():
    assert refusal_reason("127.0.0.1", LOCAL) is None
    assert refusal_reason("::1", LOCAL) is None


# ---------------------------------------------------------------------------------------------
# https: certificates are checked against the URL's hostname while connecting to the checked IP

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(str(tmp_path_factory.mktemp("tls")), "images.test")


async def to_loopback(host, port):
    return ["127.0.0.1"]


def fetch_over_tls(tls, url_host, trust_test_ca=True):
    async def go():
        async with image_server(tls.server_context()) as srv:
            policy = ImagePolicy(allow_private_networks=True, timeout_s=3.0)
            inliner = ImageInliner(
                policy, to_loopback, ssl_context=tls.client_context() if trust_test_ca else None
            )
            messages = image_message(f"https://{url_host}:{srv.port}/png")
            try:
                await inliner.inline(messages)
                return messages
            except InvalidRequest as exc:
                return exc
            finally:
                await inliner.close()

    return run(go())


@needs_openssl
def test_https_verifies_the_certificate_for_the_hostname(tls):
    messages = fetch_over_tls(tls, "images.test")
    assert first_url(messages) == data_url(PNG)


@needs_openssl
def test_https_refuses_a_certificate_for_another_name(tls):
    err = fetch_over_tls(tls, "other.test")
    assert isinstance(err, InvalidRequest) and "TLS certificate check failed" in err.message
    assert "other.test" in err.message


@needs_openssl
def test_https_refuses_an_untrusted_certificate(tls):
    err = fetch_over_tls(tls, "images.test", trust_test_ca=False)  # the system store only
    assert isinstance(err, InvalidRequest) and "TLS certificate check failed" in err.message


# ---------------------------------------------------------------------------------------------
# a few more formats


def test_mpo_from_phone_cameras_passes_as_jpeg():
    frames = [Image.new("RGB", (32, 24), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    assert normalize_image(buf.getvalue(), ImagePolicy()) == ("image/jpeg", None)


def test_animated_webp_becomes_png_of_the_first_frame():
    frames = [Image.new("RGB", (32, 24), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    messages = image_message(data_url(buf.getvalue(), "image/webp"))
    inline_sync(messages)
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/png;base64" and img.getpixel((0, 0)) == (255, 0, 0)


# ---------------------------------------------------------------------------------------------
# decompression bombs: per image, per request, per process (issue #12, item 1)


def test_request_total_is_refused_from_headers_before_any_decode(monkeypatch):
    decoded = []
    monkeypatch.setattr(images, "normalize_image", lambda *args: decoded.append(args) or ("image/png", None))
    bomb = data_url(make_bomb((3000, 3000), mode="L"))  # 9 Mpx each, a few KiB
    err = refused(bomb, ImagePolicy(max_pixels_per_request=8_000_000))
    assert err.message == (
        "the images in this request decode to 9000000 pixels in total, more than the 8000000 allowed per request"
    ) and err.param == "messages" and err.status == 400
    messages = image_message(bomb, bomb, data_url(PNG))
    with pytest.raises(InvalidRequest, match="decode to 18001200 pixels in total"):
        inline_sync(messages, ImagePolicy(max_pixels_per_request=18_000_000))
    assert decoded == []  # refused on the headers alone
    assert inline_sync(image_message(bomb, bomb), ImagePolicy(max_pixels_per_request=18_000_000)) == 2


def test_a_jpeg_counts_the_pixels_it_decodes_at_reduced_scale():
    photo = make_image("JPEG", (4000, 3000))
    probe = images.probe_image(photo, ImagePolicy())
    assert probe.size == (4000, 3000)
    assert probe.decoded_pixels == 2000 * 1500  # libjpeg decodes at 1/2: still above the 1024x768 target
    assert images.probe_image(photo, ImagePolicy(max_dimension=0)).decoded_pixels == 4000 * 3000


def test_decode_estimates_cover_what_is_measured():
    """The estimate must not undercount: DESIGN.md has the measured peaks these stay above."""
    def cost(size, mode, fmt="PNG"):
        return images.probe_image(make_bomb(size, mode, fmt), ImagePolicy(max_pixels=50_000_000)).decode_bytes

    mib = 1 << 20
    assert cost((6300, 6300), "RGBA") > 182 * mib  # measured 181.0 MiB
    assert cost((6300, 6300), "P") > 71 * mib  # measured 70.3 MiB (with transparency)
    assert cost((4000, 4000), "RGBA", "WEBP") > 272 * mib  # measured 271.6 MiB
    assert cost((600, 400), "RGB") < 20 * mib  # small images stay cheap


def test_image_that_alone_exceeds_the_decode_budget_is_refused():
    bomb = make_bomb((4000, 4000), mode="RGBA", fmt="WEBP")  # WebP decodes at ~16 bytes a pixel
    assert len(bomb) < 100_000
    err = refused(data_url(bomb, "image/webp"))
    assert err.status == 400
    assert re.search(r"the data URL \(4000x4000 WEBP\) would take about (\d+) MiB to decode, more than the 256 MiB allowed",
                     err.message)


def test_concurrent_requests_decode_within_the_process_budget(monkeypatch):
    """Eight requests with a 6300x6300 bomb each: the budget has room for one such decode at a time."""
    running, peak = [0], [0]
    lock = threading.Lock()
    real = images.normalize_image

    def counting(*args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(images, "normalize_image", counting)
    url = data_url(make_bomb())

    async def go():
        inliner = ImageInliner(ImagePolicy())
        try:
            requests = [image_message(url) for _ in range(8)]
            assert await asyncio.gather(*(inliner.inline(m) for m in requests)) == [1] * 8
            assert inliner.decode_budget.in_use == 0
            return requests
        finally:
            await inliner.close()

    requests = run(go())
    assert peak[0] == 1
    head, img = decode_data_url(first_url(requests[0]))
    assert head == "data:image/png;base64" and img.size == (1024, 1024) and img.mode == "RGBA"


def test_waiting_too_long_for_decode_room_is_a_retryable_503():
    from proxyd.errors import ServiceUnavailable

    async def go():
        inliner = ImageInliner(ImagePolicy(decode_wait_s=0.2))
        try:
            await inliner.decode_budget.acquire(inliner.decode_budget.capacity)  # someone else's huge decode
            messages = image_message(data_url(make_image("PNG", (2000, 1000))))
            with pytest.raises(ServiceUnavailable) as info:
                await inliner.inline(messages)
            inliner.decode_budget.release(inliner.decode_budget.capacity)
            assert await inliner.inline(messages) == 1
            return info.value
        finally:
            await inliner.close()

    err = run(go())
    assert err.status == 503 and err.headers["Retry-After"] == "1" and "busy decoding" in err.message


def test_a_cancelled_request_keeps_its_room_until_its_decode_ends(monkeypatch):
    started, finish = threading.Event(), threading.Event()
    real = images.normalize_image

    def slow(*args):
        started.set()
        finish.wait(10)
        return real(*args)

    monkeypatch.setattr(images, "normalize_image", slow)

    async def go():
        inliner = ImageInliner(ImagePolicy())
        try:
            task = asyncio.ensure_future(inliner.inline(image_message(data_url(make_bomb((3000, 3000))))))
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            held = inliner.decode_budget.in_use  # the thread still decodes, so its memory is still in use
            finish.set()
            for _ in range(200):
                if inliner.decode_budget.in_use == 0:
                    break
                await asyncio.sleep(0.01)
            return held, inliner.decode_budget.in_use
        finally:
            finish.set()
            await inliner.close()

    held, after = run(go())
    assert held > 0 and after == 0


async def loop_turns(n: int = 20) -> None:
    """Lets the event loop run n times: every waiter woken so far has run (no wall-clock wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


def test_decode_budget_is_first_come_first_served():
    async def go():
        budget = images.DecodeBudget(10)
        order = []

        async def take(name, n):
            await budget.acquire(n)
            order.append(name)

        await budget.acquire(6)
        big = asyncio.ensure_future(take("big", 8))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 2))  # would fit now, but waits behind the big one
        await loop_turns()
        assert order == [] and budget.in_use == 6
        budget.release(6)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and budget.in_use == 10
        # a waiter that gives up lets the ones behind it through
        budget.release(10)
        await budget.acquire(9)
        stuck = asyncio.ensure_future(take("stuck", 5))
        await asyncio.sleep(0)
        behind = asyncio.ensure_future(take("behind", 1))
        await asyncio.sleep(0)
        stuck.cancel()
        await loop_turns()
        assert behind.done() and budget.in_use == 10

    run(go())


def test_shrinking_in_strips_matches_pillows_thumbnail():
    for mode, size in (("RGB", (3000, 1700)), ("RGBA", (2500, 2500)), ("P", (2100, 900))):
        src = Image.open(io.BytesIO(make_image("PNG", size, mode="RGBA" if mode == "RGBA" else "RGB")))
        src = src.convert(mode)
        mine = images.shrink(src, 1024, alpha=mode == "RGBA")
        ref = src.convert("RGBA" if mode == "RGBA" else "RGB")
        ref.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
        assert mine.size == ref.size and mine.mode == ref.mode
        diff = sum(abs(a - b) for a, b in zip(mine.tobytes(), ref.tobytes())) / len(ref.tobytes())
        assert diff < 1.0, (mode, diff)  # same picture, within rounding


def test_exif_rotation_is_applied_to_downscaled_images():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.open(io.BytesIO(make_image("PNG", (2000, 1000)))).save(buf, "JPEG", exif=exif)
    messages = image_message(data_url(buf.getvalue(), "image/jpeg"))
    inline_sync(messages)
    head, img = decode_data_url(first_url(messages))
    assert head == "data:image/jpeg;base64" and img.size == (512, 1024)


def test_memory_is_handed_back_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert images.malloc_trim is not None and images.malloc_trim(0) in (0, 1)


def _memory_mb(pid: int) -> dict[str, float]:
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if line.startswith(("VmRSS", "VmHWM")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux /proc memory counters")
def test_bombs_in_concurrent_requests_keep_the_process_small(tmp_path):
    """The issue's attack on a real proxyd process with its default settings: 6300x6300 RGBA PNGs of
    zeros (~154 KB each, 159 MB decoded), eight to a request and one to a request, all at once. Before
    the fix this took the process from ~105 MB to ~2.9 GB and left it above 1.2 GB."""
    from tests.test_process import ADMIN, ROOT, free_port, new_key, wait_http

    emu_port, port = free_port(), free_port()
    emu = subprocess.Popen([sys.executable, "-m", "ollama_emulator", "--port", str(emu_port)], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("logging:\n  access_log: false\n")
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": f"http://127.0.0.1:{emu_port}",
           "PROXYD_DB": str(tmp_path / "ledger.db"), "PROXYD_ADMIN_TOKEN": ADMIN, "PROXYD_CONFIG": str(cfg)}
    proxy = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"http://127.0.0.1:{emu_port}/", emu)
        wait_http(base + "/healthz", proxy)
        headers = {"Authorization": f"Bearer {new_key(base, 'alice')}"}

        def chat(*urls: str) -> httpx.Response:
            body = {"model": "moondream", "messages": image_message(*urls), "max_tokens": 5}
            return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=120)

        # Warm up (Pillow loaded, a decode thread started), then measure from here.
        assert chat(data_url(make_image("PNG", (3000, 2000)))).status_code == 200
        start = _memory_mb(proxy.pid)["VmRSS"]
        with open(f"/proc/{proxy.pid}/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak (VmHWM) to the current RSS

        bomb = data_url(make_bomb())
        statuses: list[int] = []
        senders = [threading.Thread(target=lambda n=n: statuses.append(chat(*[bomb] * n).status_code))
                   for n in (8, 8, 1, 1, 1, 1, 1, 1)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(180)
        peak = _memory_mb(proxy.pid)["VmHWM"] - start
        for _ in range(50):  # memory is handed back as each decode ends; allow the last one to finish
            returned = _memory_mb(proxy.pid)["VmRSS"] - start
            if returned < 64:
                break
            time.sleep(0.1)
        print(f"RSS at start {start:.0f} MB; peak +{peak:.0f} MB; afterwards +{returned:.0f} MB")
        assert peak < 300, f"peak RSS grew by {peak:.0f} MB"
        assert returned < 64, f"RSS stayed {returned:.0f} MB above its start"
        assert sorted(statuses) == [200] * 6 + [400] * 2  # eight bombs are more than a request may decode
    finally:
        for p in (proxy, emu):
            p.terminate()
            p.wait(15)


# ---------------------------------------------------------------------------------------------
# configurable deny_networks and the upstream's own endpoint (issue #12, item 16)


def test_deny_endpoints_refuse_one_port_of_an_address():
    policy = ImagePolicy(allow_private_networks=True, deny_endpoints=(("127.0.0.1", 11434), ("::1", 11434)))
    assert refusal_reason("127.0.0.1", policy, 11434) == "the upstream model server's own address"
    assert refusal_reason("::ffff:127.0.0.1", policy, 11434) == "the upstream model server's own address"
    assert refusal_reason("::1", policy, 11434) is not None
    assert refusal_reason("127.0.0.1", policy, 8080) is None
    assert refusal_reason("127.0.0.2", policy, 11434) is None
    err = refused("http://127.0.0.1:11434/api/tags", policy, no_dns)
    assert "address 127.0.0.1 is the upstream model server's own address" in err.message

    async def localhost(host, port):
        return ["127.0.0.1"]

    err = refused("http://ollama.test:11434/api/version", policy, localhost)
    assert "ollama.test resolves to 127.0.0.1, which is the upstream model server's own address" in err.message


def test_upstream_endpoints_are_what_the_upstream_url_reaches():
    assert images.upstream_endpoints("http://127.0.0.1:11434") == (("127.0.0.1", 11434),)
    assert images.upstream_endpoints("https://[::1]/ollama") == (("::1", 443),)
    assert ("127.0.0.1", 11434) in images.upstream_endpoints("http://localhost:11434")


@pytest.mark.parametrize("value", [["10.0.0.0/33"], ["not-a-cidr"], [10], ["169.254.169.254", None]])
def test_a_bad_deny_network_stops_the_start_naming_the_key(value):
    from proxyd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^config: 'images.deny_networks' has .* which is not a network"):
        load_config(None, {"images.deny_networks": value}, env={})
    assert load_config(None, {"images.deny_networks": ["169.254.169.254", "fd00::/8"]}, env={})


def test_a_bad_deny_network_in_config_yaml_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("images:\n  allow_private_networks: true\n  deny_networks: [169.254.0.0/16, 10.0.0.0/40]\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "app.py", "--config", str(cfg)], cwd=root, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "proxyd: config: 'images.deny_networks' has '10.0.0.0/40', which is not a network "
        "(write CIDRs such as 169.254.0.0/16 or fd00::/8)"
    ]
