"""Vision through the proxy: moondream with data URLs and fetched http(s) URLs (issue #4)."""

import base64
import io

import openai
import pytest
from PIL import Image

from tests.fixtures_images import GIF, PNG, data_url, image_message, image_server, make_image


def start_image_server(world):
    cm = image_server()
    server = world.call(cm.__aenter__())
    return cm, server


def last_upstream_image(world) -> str:
    req = [r for r in world.emu.requests if r["path"] == "/v1/chat/completions"][-1]
    return req["body"]["messages"][0]["content"][0]["image_url"]["url"]


def test_vision_with_data_url(world):
    key = world.new_user("alice")
    r = world.client(key).chat.completions.create(model="moondream", messages=image_message(data_url(PNG)))
    assert r.choices[0].message.content
    assert r.usage.prompt_tokens > 729  # the emulator charges 729 positions per image, like moondream
    assert last_upstream_image(world) == data_url(PNG)  # an accepted format passes unchanged
    world.settle_all()
    [(reserved,)] = world.rows("SELECT reserved_prompt FROM requests")
    assert reserved >= 729  # the reservation counts the image at the model's image cost


def test_gif_is_converted_to_png(world):
    key = world.new_user("alice")
    world.client(key).chat.completions.create(model="moondream", messages=image_message(data_url(GIF, "image/gif")))
    assert last_upstream_image(world).startswith("data:image/png;base64,")


def test_url_from_local_server_arrives_as_data_url(make_world):
    world = make_world(config={"images.allow_private_networks": True})
    cm, server = start_image_server(world)
    try:
        key = world.new_user("alice")
        r = world.client(key).chat.completions.create(model="moondream",
                                                      messages=image_message(server.url("/redirect/png")))
        assert r.choices[0].message.content
        sent = last_upstream_image(world)
        assert sent.startswith("data:image/png;base64,")
        got = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
        assert got.tobytes() == Image.open(io.BytesIO(PNG)).tobytes()
        assert all("authorization" not in {k.lower() for k in h} for h in server.headers)  # no client credentials
    finally:
        world.call(cm.__aexit__(None, None, None))


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://localhost/x.png", "http://[::1]/x.png", "http://0.0.0.0/x.png",
    "http://10.1.2.3/x.png", "http://192.168.1.1/x.png", "http://169.254.169.254/latest/meta-data",
    "http://[::ffff:127.0.0.1]/x.png", "file:///etc/passwd", "ftp://example.com/x.png",
])
def test_refused_urls_are_400_and_not_billed(world, url):
    key = world.new_user("alice")
    with pytest.raises(openai.BadRequestError) as e:
        world.client(key).chat.completions.create(model="moondream", messages=image_message(url))
    assert "image_url" in e.value.message
    world.settle_all()
    assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]


def test_local_server_refusals_with_private_networks_allowed(make_world):
    # Served locally (private networks allowed for the test), but each answer is unusable.
    world = make_world(config={"images.allow_private_networks": True, "images.max_bytes": 50_000,
                               "images.timeout_s": 0.5})
    cm, server = start_image_server(world)
    try:
        key = world.new_user("alice")
        for path, error in (("/html", openai.BadRequestError), ("/corrupt", openai.BadRequestError),
                            ("/big", openai.APIStatusError), ("/hang", openai.BadRequestError)):
            with pytest.raises(error) as e:
                world.client(key).chat.completions.create(model="moondream", messages=image_message(server.url(path)))
            assert e.value.status_code in (400, 413), (path, e.value)
        with pytest.raises(openai.BadRequestError):  # corrupt data URL
            world.client(key).chat.completions.create(
                model="moondream", messages=image_message("data:image/png;base64," + base64.b64encode(b"nope").decode()))
        world.settle_all()
        assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]
    finally:
        world.call(cm.__aexit__(None, None, None))


def test_large_image_is_downscaled(world):
    key = world.new_user("alice")
    big = make_image("PNG", size=(2000, 1000))
    world.client(key).chat.completions.create(model="moondream", messages=image_message(data_url(big)))
    sent = last_upstream_image(world)
    img = Image.open(io.BytesIO(base64.b64decode(sent.split(",", 1)[1])))
    assert max(img.size) == 1024 and img.size[0] == 2 * img.size[1]


def test_deny_networks_are_refused_even_with_private_networks_allowed(make_world):
    # An operator who must allow private networks still blocks the metadata address and a subnet.
    world = make_world(config={"images.allow_private_networks": True,
                               "images.deny_networks": ["169.254.169.254/32", "127.0.0.0/8"]})
    cm, server = start_image_server(world)
    try:
        key = world.new_user("alice")
        for url, net in (("http://169.254.169.254/latest/meta-data", "169.254.169.254/32"),
                         (server.url("/png"), "127.0.0.0/8")):
            with pytest.raises(openai.BadRequestError) as e:
                world.client(key).chat.completions.create(model="moondream", messages=image_message(url))
            assert e.value.status_code == 400 and e.value.body["param"] == "messages[0].content[0].image_url"
            assert f"is denied by configuration (deny_networks {net})" in e.value.message
        assert server.hits == []  # refused before any connection
        world.settle_all()
        assert world.rows("SELECT COUNT(*) FROM requests") == [(0,)]
    finally:
        world.call(cm.__aexit__(None, None, None))


def test_the_upstream_itself_is_refused_with_private_networks_allowed(make_world):
    world = make_world(config={"images.allow_private_networks": True})
    cm, server = start_image_server(world)
    try:
        key = world.new_user("alice")
        with pytest.raises(openai.BadRequestError) as e:
            world.client(key).chat.completions.create(
                model="moondream", messages=image_message(world.upstream_url + "/api/tags"))
        assert "is the upstream model server's own address" in e.value.message
        assert not [r for r in world.emu.requests if r["path"] == "/api/tags"]
        # the same address on another port (a local image server) is still allowed, as configured
        world.client(key).chat.completions.create(model="moondream", messages=image_message(server.url("/png")))
        assert last_upstream_image(world).startswith("data:image/png;base64,")
    finally:
        world.call(cm.__aexit__(None, None, None))
