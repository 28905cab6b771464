"""The web dashboard (issue #17) in a real headless Chromium, driven by Playwright.

Debian's ``chromium`` (/usr/bin/chromium) is launched by path: Playwright's own browser download is not
used. Without a Chromium (or without Playwright) the browser tests skip with the reason locally and fail
under CI (``PROXYD_CI_REQUIRE_SERVICES=1`` or ``CI`` set: .ci/run installs Chromium).

Every browser test saves a screenshot in its tmp dir; with ``PROXYD_DASHBOARD_SCREENSHOTS=<dir>`` the
README's screenshots (dashboard-user.png, dashboard-admin.png) are written there too. Each test also fails
on any Content-Security-Policy violation, uncaught page error or alert dialog.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from proxyd.periods import day_key
from proxyd.storage import REQUEST_COLUMNS, iso_ms
from tests.harness import ADMIN_TOKEN

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")) if p
                 and os.path.exists(p)), None)
PRICING = {"default": {"input_per_million_usd": 1000, "output_per_million_usd": 2000}}  # visible costs
MARKUP = "<img src=x onerror=alert(1)>"
WIDE, NARROW = {"width": 1280, "height": 800}, {"width": 390, "height": 844}


def _unavailable(reason: str) -> None:
    if os.environ.get("PROXYD_CI_REQUIRE_SERVICES") == "1" or os.environ.get("CI"):
        pytest.fail(reason + " -- required under CI (.ci/run installs chromium; playwright is in requirements-dev.txt)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -r requirements-dev.txt)")
    if CHROMIUM is None:
        _unavailable("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


class Tab:
    """A page in a fresh browser context (its own sessionStorage), recording what must not happen."""

    def __init__(self, browser, base: str, shots: Path, viewport=WIDE) -> None:
        # Clipboard access as a user who allowed it (the admin view's copy button).
        self.context = browser.new_context(viewport=viewport, permissions=["clipboard-read", "clipboard-write"])
        self.page = self.context.new_page()
        self.base = base
        self.shots = shots
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("dialog", self._dialog)

    def _console(self, msg) -> None:
        text = msg.text
        # A failed API call (401, 429...) is logged by Chromium as a resource error: the page shows it, fine.
        if msg.type == "error" and "Failed to load resource" not in text:
            self.problems.append(f"console: {text}")

    def _dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        if dialog.type == "confirm":
            dialog.accept()  # the admin view confirms a revocation
        else:
            dialog.dismiss()

    def open(self, path: str) -> None:
        self.page.goto(self.base + path)

    def sign_in(self, secret: str) -> None:
        self.page.fill("#key", secret)
        self.page.click("#signin-submit")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        target = os.environ.get("PROXYD_DASHBOARD_SCREENSHOTS")
        if target and name in ("dashboard-user", "dashboard-admin"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def check_clean(self) -> None:
        assert not self.problems, self.problems
        assert not [d for d in self.dialogs if not d.startswith("confirm")], self.dialogs

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser, tmp_path):
    opened: list[Tab] = []

    def make(world, viewport=WIDE) -> Tab:
        t = Tab(browser, world.url, tmp_path, viewport)
        opened.append(t)
        return t

    yield make
    for t in opened:
        t.close()


def chart_sum(tab: Tab, canvas: str) -> float:
    """The sum of every bar of a chart, read from the Chart.js instance the page drew."""
    return tab.page.evaluate(
        "(id) => Chart.getChart(document.getElementById(id)).data.datasets"
        ".reduce((a, d) => a + d.data.reduce((x, y) => x + y, 0), 0)", canvas)


def chart_models(tab: Tab, canvas: str) -> list[str]:
    return tab.page.evaluate("(id) => Chart.getChart(document.getElementById(id)).data.datasets.map(d => d.label)",
                             canvas)


def tile(tab: Tab, name: str) -> str:
    return tab.text(f"[data-tile={name}] .v")


def no_horizontal_scroll(tab: Tab) -> None:
    width = tab.page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways at {tab.page.viewport_size}: {width}"


# -- flows ---------------------------------------------------------------------------------------------------


def test_user_signs_in_makes_requests_and_sees_them_after_a_reload(make_world, tabs):
    world = make_world(config={"pricing": PRICING})
    key = world.new_user("alice")
    tab = tabs(world)
    tab.open("/dashboard")
    csp = httpx.get(world.url + "/dashboard").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "form-action 'none'" in csp
    tab.sign_in(key)
    tab.page.wait_for_selector("#requests td")
    assert tab.text("#who") == "alice"
    assert tile(tab, "tokens") == "0" and chart_sum(tab, "chart-tokens") == 0
    assert "No requests yet." in tab.text("#requests")

    client = world.client(key)
    usages = [client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}]).usage,
              client.chat.completions.create(model="moondream", messages=[{"role": "user", "content": "Hello"}]).usage,
              client.completions.create(model="llama3.2:1b", prompt="Once upon a time", max_tokens=8).usage]
    world.settle_all()
    tokens = sum(u.total_tokens for u in usages)
    cost_nusd = sum(u.prompt_tokens * 1000 + u.completion_tokens * 2000 for u in usages) * 1000  # 1e3 nano-USD per USD/Mtok

    tab.page.reload()  # the key survives the reload (sessionStorage), nothing asks for it again
    tab.page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length === 3")
    assert tile(tab, "tokens") == f"{tokens:,}" and tile(tab, "requests") == "3"
    assert chart_sum(tab, "chart-tokens") == tokens
    assert round(chart_sum(tab, "chart-cost") * 1e9) == cost_nusd
    assert sorted(chart_models(tab, "chart-tokens")) == ["llama3.2:1b", "moondream:latest"]
    assert tile(tab, "cost") == "$" + f"{cost_nusd / 1e9:.6f}".rstrip("0")
    rows = tab.page.eval_on_selector_all("#requests tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert [r[1] for r in rows] == ["llama3.2:1b", "moondream:latest", "llama3.2:1b"][::-1]
    assert rows[0][2] == "completions" and rows[0][3] == str(usages[2].prompt_tokens), rows
    assert rows[0][4] == str(usages[2].completion_tokens) and rows[0][6] == "settled 200", rows
    assert all(r[7].endswith(" ms") for r in rows), rows
    invoice = tab.text("#invoice")
    assert "llama3.2:1b" in invoice and "moondream:latest" in invoice and "$" + f"{cost_nusd / 1e9:.6f}".rstrip("0") in invoice

    # The key is in this tab's sessionStorage, and nowhere a URL, a cookie or another tab could carry it.
    assert tab.page.evaluate("() => sessionStorage.getItem('proxyd.user_key')") == key
    assert key not in tab.page.url and tab.context.cookies() == []
    assert tab.page.evaluate("() => localStorage.length") == 0
    with tab.page.expect_download() as dl:
        tab.page.click("#csv")
    csv = Path(dl.value.path()).read_text().splitlines()
    assert csv[0] == "day,model,requests,prompt_tokens,completion_tokens,total_tokens,cost_usd"
    assert sum(int(line.split(",")[5]) for line in csv[1:]) == tokens
    tab.shot("dashboard-user")
    tab.check_clean()


def test_requests_are_paginated_newest_first(make_world, tabs):
    world = make_world()
    key = world.new_user("paula")
    client = world.client(key)
    for i in range(23):
        client.chat.completions.create(model="llama3.2:1b", max_tokens=1 + i,
                                       messages=[{"role": "user", "content": "Hi"}])
    world.settle_all()
    ids = [r[0] for r in world.rows("SELECT id FROM requests WHERE user_id = 'paula' ORDER BY rowid DESC")]
    tab = tabs(world)
    tab.open("/dashboard")
    tab.sign_in(key)
    tab.page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length === 20")
    assert tab.page.is_disabled("#newer") and not tab.page.is_disabled("#older")
    tab.page.click("#older")
    tab.page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length === 3")
    assert tab.page.is_disabled("#older")
    tab.page.click("#newer")
    tab.page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length === 20")
    # Over the API: the pages are the rows newest first, each once, through the cursor.
    seen, cursor = [], None
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = world.get("/v1/requests", key, **params).json()
        seen += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    tab.shot("requests-pages")
    tab.check_clean()


def test_admin_creates_a_user_lowers_a_limit_and_the_user_sees_it_exhausted(make_world, tabs):
    world = make_world(config={"pricing": PRICING})
    admin = tabs(world)
    admin.open("/dashboard/admin")
    admin.sign_in(ADMIN_TOKEN)
    admin.page.wait_for_selector("#users td")

    # A user id the API refuses: its own message, next to the field.
    admin.page.fill("#create-user", "no spaces")
    admin.page.click("#create-form button[type=submit]")
    admin.page.wait_for_selector("#create-user-error:not(:empty)")
    assert "'user_id' must be" in admin.text("#create-user-error")

    admin.page.fill("#create-user", "bob")
    admin.page.click("#create-form button[type=submit]")
    admin.page.wait_for_selector("#newkey:not([hidden])")
    key = admin.text("#newkey-value")
    assert key.startswith("sk-proxyd-") and admin.text("#newkey-user") == "bob"
    admin.page.click("#newkey-copy")
    admin.page.wait_for_selector("#newkey-copy:text('Copied')")
    assert admin.page.evaluate("() => navigator.clipboard.readText()") == key
    admin.page.click("#newkey-done")
    assert admin.text("#newkey-value") == ""  # shown once: gone from the page
    admin.page.wait_for_selector("[data-limits=bob]")

    client = world.client(key)
    client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])

    admin.page.click("[data-limits=bob]")
    admin.page.wait_for_selector("#limits-form:not([hidden])")
    admin.page.fill("#lim-requests_per_day", "two")
    admin.page.click("#limits-form button[type=submit]")
    admin.page.wait_for_selector("#lim-requests_per_day-error:not(:empty)")
    assert "limits.requests_per_day must be a whole number" in admin.text("#lim-requests_per_day-error")
    assert admin.page.get_attribute("#lim-requests_per_day", "aria-invalid") == "true"
    admin.page.fill("#lim-requests_per_day", "2")
    admin.page.click("#limits-form button[type=submit]")
    admin.page.wait_for_selector("#limits-form [role=status]")
    assert admin.text("#lim-requests_per_day-error") == ""
    assert world.admin("GET", "/admin/users/bob/limits").json()["overrides"]["requests_per_day"] == 2

    client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])
    world.settle_all()

    user = tabs(world)
    user.open("/dashboard")
    user.sign_in(key)
    limit = "[data-limit=requests_per_day]"
    user.page.wait_for_selector(limit)
    assert "exhausted" in user.page.get_attribute(limit, "class")
    assert "2 used · 0 reserved · 0 remaining of 2" in user.text(limit)
    assert user.text(f"{limit} .reset").startswith("resets in ")
    assert user.page.evaluate(f"() => document.querySelector('{limit} .meter .used').style.width") == "100%"
    user.shot("limit-exhausted")

    # The admin's table counts bob's two settled requests this month.
    admin.page.reload()
    admin.page.wait_for_selector("#users td")
    row = admin.page.eval_on_selector("[data-limits=bob]", "b => [...b.closest('tr').cells].map(c => c.textContent)")
    assert row[0] == "bob" and row[1] == "active" and row[2] == "2", row
    admin.page.wait_for_selector("[data-tile=rps]", timeout=10000)  # the live tiles' second snapshot
    admin.shot("dashboard-admin")
    user.check_clean()
    admin.check_clean()


def test_disable_and_revoke_from_the_admin_view_lock_the_user_out(make_world, tabs):
    world = make_world()
    key = world.new_user("carol")
    user = tabs(world)
    user.open("/dashboard")
    user.sign_in(key)
    user.page.wait_for_selector("#requests td")

    admin = tabs(world)
    admin.open("/dashboard/admin")
    admin.sign_in(ADMIN_TOKEN)
    admin.page.click("[data-toggle=carol]")
    admin.page.wait_for_selector("#users tr.disabled")
    user.page.reload()
    user.page.wait_for_selector("#signin-error:not(:empty)")
    assert "disabled" in user.text("#signin-error")
    admin.page.click("[data-toggle=carol]")
    admin.page.wait_for_selector("#users tr:not(.disabled) [data-toggle=carol]")
    user.sign_in(key)  # enabled again: the key works again
    user.page.wait_for_selector("#app:not([hidden]) #requests td")

    admin.page.click("[data-revoke]")  # confirm() is accepted
    admin.page.wait_for_selector("#users .badge.off")
    assert any(d.startswith("confirm") for d in admin.dialogs)

    # The tab signed in before loses its session at the next load; a new one cannot sign in.
    user.page.reload()
    user.page.wait_for_selector("#signin-error:not(:empty)")
    assert user.page.is_visible("#signin") and not user.page.is_visible("#app")
    assert user.page.evaluate("() => sessionStorage.getItem('proxyd.user_key')") is None
    fresh = tabs(world)
    fresh.open("/dashboard")
    fresh.sign_in(key)
    fresh.page.wait_for_selector("#signin-error:not(:empty)")
    assert "Incorrect API key provided" in fresh.text("#signin-error")
    assert not fresh.page.is_visible("#app")
    fresh.shot("revoked-key")

    # Another key from the admin view: shown once, and it signs in where the revoked one cannot.
    admin.page.click("[data-addkey=carol]")
    admin.page.wait_for_selector("#newkey:not([hidden])")
    new_key = admin.text("#newkey-value")
    assert new_key != key and admin.text("#newkey-user") == "carol"
    fresh.sign_in(new_key)
    fresh.page.wait_for_selector("#app:not([hidden]) #requests td")
    assert fresh.text("#who") == "carol" and fresh.text("#signin-error") == ""
    for t in (user, admin, fresh):
        t.check_clean()


def _row(user_id: str, model: str, at: float, n: int, *, voided: bool = False) -> tuple:
    values = {"id": f"req_test{n:020d}", "user_id": user_id, "key_id": "key_test", "model": model,
              "endpoint": "chat.completions", "stream": 0, "status": "voided" if voided else "settled",
              "day": day_key(at), "created_at": iso_ms(at), "reserved_prompt": 5, "reserved_completion": 5,
              "http_status": 502 if voided else 200, "finished_at": iso_ms(at), "latency_ms": 3 + n,
              "prompt_tokens": None if voided else 5 + n, "completion_tokens": None if voided else 2,
              "usage_source": None if voided else "reported", "input_price_nusd_per_mtok": 0 if voided else 1000,
              "output_price_nusd_per_mtok": 0 if voided else 1000, "cost_nusd": None if voided else 7 + n,
              "error": "upstream" if voided else None, "upstream": "default", "attempts": 1}
    return tuple(values[c] for c in REQUEST_COLUMNS)


def _record_settled(world, user_id: str, model: str) -> None:
    """A settled row whose model is whatever a client sent, recorded through the Ledger port as the meter
    records one: proxyd's own checks refuse such a name today, and the dashboard must not rely on them."""

    async def record():
        await world.ctx.ledger.record_settled(_row(user_id, model, world.clock(), 0))

    world.call(record())


def test_the_ledger_reads_of_the_dashboard(make_world):
    """The three Ledger port methods the dashboard added, on rows of two days and two users (what a second
    Ledger implementation must answer the same way)."""
    world = make_world()
    ledger = world.ctx.ledger
    now = world.clock()
    d1, d2 = now - 86400, now
    rows = [_row("a", "m1", d1, 1), _row("a", "m2", d1 + 1, 2), _row("b", "m1", d1 + 2, 3), _row("a", "m1", d1 + 3, 4),
            _row("a", "m1", d2, 5), _row("a", "m2", d2 + 0.5, 6)]

    async def record():
        for r in rows:
            await ledger.record_settled(r)
        ledger.record_voided(_row("a", "m1", d2 + 0.25, 7, voided=True))

    world.call(record())
    world.settle_all()
    day1, day2 = day_key(d1), day_key(d2)
    got = world.call(ledger.usage_by_day_and_model(user_id="a", start=day1, end=day2))
    assert [tuple(r) for r in got] == [(day1, "m1", 2, 6 + 9, 4, 8 + 11), (day1, "m2", 1, 7, 2, 9),
                                       (day2, "m1", 1, 10, 2, 12), (day2, "m2", 1, 11, 2, 13)]
    everyone = world.call(ledger.usage_by_day_and_model(user_id=None, start=day1, end=day1))
    assert [tuple(r)[:3] for r in everyone] == [(day1, "m1", 3), (day1, "m2", 1)]
    assert world.call(ledger.usage_by_day_and_model(user_id="a", start=day2, end=day2))[0].day == day2

    # The newest request is the first row of the first page (here: the voided one, written last).
    last = world.call(ledger.last_request_at(["a", "b", "nobody"]))
    assert last == {"a": iso_ms(d2 + 0.25), "b": iso_ms(d1 + 2)}

    pages, cursor = [], None
    while True:
        page, cursor = world.call(ledger.user_requests(user_id="a", limit=2, cursor=cursor))
        pages.append([r.id for r in page])
        if cursor is None:
            break
    # Newest day first; within a day, the order the rows were written, newest first.
    assert pages == [["req_test00000000000000000007", "req_test00000000000000000006"],
                     ["req_test00000000000000000005", "req_test00000000000000000004"],
                     ["req_test00000000000000000002", "req_test00000000000000000001"]]
    voided = world.call(ledger.user_requests(user_id="a", limit=1, cursor=None))[0][0]
    assert (voided.status, voided.http_status, voided.cost_nusd, voided.prompt_tokens) == ("voided", 502, None, None)
    assert world.call(ledger.user_requests(user_id="nobody", limit=5, cursor=None)) == ([], None)
    for bad in ("", "x", "2026-01-01", "2026-01-01,", "2026-01-01,-1", "2026-01-01,1e3"):
        with pytest.raises(ValueError):
            world.call(ledger.user_requests(user_id="a", limit=2, cursor=bad))


def test_markup_from_clients_renders_as_text(make_world, tabs):
    world = make_world()
    key = world.new_user("dave")
    with pytest.raises(openai.BadRequestError):  # proxyd refuses the name itself...
        world.client(key).chat.completions.create(model=MARKUP, messages=[{"role": "user", "content": "Hi"}])
    _record_settled(world, "dave", MARKUP)  # ...but a ledger may hold anything a client sent
    world.settle_all()

    user = tabs(world)
    user.open("/dashboard")
    user.sign_in(key)
    user.page.wait_for_function("() => document.querySelectorAll('#requests tbody tr').length === 1")
    assert user.page.eval_on_selector("#requests tbody td:nth-child(2)", "c => c.textContent") == MARKUP
    assert MARKUP in user.text("#invoice")
    assert MARKUP in chart_models(user, "chart-tokens")
    assert user.page.query_selector_all("main img") == []

    admin = tabs(world)
    admin.open("/dashboard/admin")
    admin.sign_in(ADMIN_TOKEN)
    admin.page.wait_for_selector("#by-model td")
    assert MARKUP in admin.text("#by-model")
    # Markup typed into the admin's fields comes back in the API's messages: text there too.
    admin.page.fill("#create-user", MARKUP)
    admin.page.click("#create-form button[type=submit]")
    admin.page.wait_for_selector("#create-user-error:not(:empty)")
    admin.page.click("[data-limits=dave]")
    admin.page.wait_for_selector("#limits-form:not([hidden])")
    admin.page.fill("#lim-models", '{"%s": {"tokens_per_day": 5}}' % MARKUP)
    admin.page.click("#limits-form button[type=submit]")
    admin.page.wait_for_selector("#lim-models-error:not(:empty)")
    assert MARKUP in admin.text("#lim-models-error")  # "... '<img ...>' is not a model name ..."
    assert admin.page.query_selector_all("main img") == []
    admin.page.wait_for_timeout(300)  # an onerror would have fired by now (the image fails at once)
    admin.shot("markup-as-text")
    user.shot("markup-as-text-user")
    for t in (user, admin):
        t.check_clean()  # no alert dialog, no CSP violation, no page error


def test_keyboard_alone_reaches_sign_in_and_narrow_screens_do_not_scroll_sideways(make_world, tabs):
    world = make_world(config={"pricing": PRICING})
    key = world.new_user("erin")
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])
    world.settle_all()
    for path, secret, ready in (("/dashboard", key, "#requests td"), ("/dashboard/admin", ADMIN_TOKEN, "#users td")):
        tab = tabs(world, viewport=NARROW)
        tab.open(path)
        tab.page.evaluate("() => document.activeElement && document.activeElement.blur()")
        for _ in range(5):  # from the top of the page, Tab reaches the field...
            tab.page.keyboard.press("Tab")
            if tab.page.evaluate("() => document.activeElement.id") == "key":
                break
        assert tab.page.evaluate("() => document.activeElement.id") == "key"
        tab.page.keyboard.type(secret)
        tab.page.keyboard.press("Tab")  # ...then the submit button, and Enter signs in
        assert tab.page.evaluate("() => document.activeElement.id") == "signin-submit"
        tab.page.keyboard.press("Enter")
        tab.page.wait_for_selector(ready)
        no_horizontal_scroll(tab)
        # Every control of the signed-in page is reachable by Tab (none taken out of the order).
        assert tab.page.evaluate("() => [...document.querySelectorAll('button, input, textarea')]"
                                 ".filter(e => e.tabIndex < 0).length") == 0
        tab.shot("narrow" + path.replace("/", "-"))
        tab.check_clean()
    wide = tabs(world)
    wide.open("/dashboard")
    wide.sign_in(key)
    wide.page.wait_for_selector("#requests td")
    no_horizontal_scroll(wide)
    wide.check_clean()


def test_live_tiles_show_the_traffic_of_the_last_interval(make_world, tabs):
    world = make_world()
    key = world.new_user("ivan")
    admin = tabs(world)
    admin.open("/dashboard/admin")
    admin.sign_in(ADMIN_TOKEN)
    admin.page.wait_for_selector("[data-tile=rps]", timeout=10000)  # two snapshots: rates from here on
    assert tile(admin, "errors") == "—" and tile(admin, "rps") == "0.00"  # no traffic yet
    client = world.client(key)
    tokens = sum(client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])
                 .usage.total_tokens for _ in range(4))
    # The first interval that saw any of the requests: success only, so a 0.0% error rate, tokens per second,
    # and latency quantiles within the histogram's buckets.
    admin.page.wait_for_function("() => document.querySelector('[data-tile=errors] .v').textContent !== '—'",
                                 timeout=10000)
    assert tile(admin, "errors") == "0.0%"
    assert float(tile(admin, "rps")) > 0 and 0 < float(tile(admin, "tps")) <= tokens
    for q in ("p50", "p99"):
        assert tile(admin, q).endswith(" ms") and float(tile(admin, q)[:-3]) >= 0, tile(admin, q)
    assert tile(admin, "inflight") == "0"
    admin.shot("live-tiles")
    admin.check_clean()


def test_admin_view_is_useless_without_the_token(make_world, tabs):
    world = make_world()
    world.new_user("frank")
    tab = tabs(world)
    tab.open("/dashboard/admin")
    tab.sign_in("not-the-token")
    tab.page.wait_for_selector("#signin-error:not(:empty)")
    assert "invalid admin token" in tab.text("#signin-error")
    assert not tab.page.is_visible("#app") and "frank" not in tab.page.content()
    for path in ("/admin/overview", "/admin/live", "/admin/usage/daily", "/admin/users/frank/requests"):
        r = httpx.get(world.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    tab.check_clean()


# -- without a browser ---------------------------------------------------------------------------------------


def test_no_key_or_token_in_the_logs(make_world, caplog):
    world = make_world(config={"logging.access_log": True})
    key = world.new_user("gina")
    caplog.set_level(logging.DEBUG)
    world.client(key).chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}])
    for path in ("/v1/usage/daily", "/v1/requests", "/v1/limits", "/v1/requests?cursor=bad"):
        world.get(path, key)
    for path in ("/admin/overview", "/admin/live", "/admin/usage/daily", "/admin/users/gina/requests"):
        assert world.admin("GET", path).status_code == 200
    world.get("/v1/usage/daily", "sk-proxyd-wrong-key")
    world.admin("GET", "/admin/overview", token="wrong-admin-token")
    world.settle_all()
    lines = [r.getMessage() for r in caplog.records]
    assert any('"path":"/admin/overview"' in line for line in lines), lines  # the access log did run
    for secret in (key, ADMIN_TOKEN, "sk-proxyd-wrong-key", "wrong-admin-token", "Bearer"):
        assert not [line for line in lines if secret in line], secret


def test_dashboard_api_errors_are_the_apis_own(make_world):
    world = make_world()
    key = world.new_user("hugo")
    cases = [
        (world.get("/v1/requests", key, limit="0"), 400, "limit"),
        (world.get("/v1/requests", key, limit="١٠"), 400, "limit"),  # other scripts' digits are not digits here
        (world.get("/v1/requests", key, cursor="2026-01-01,x"), 400, "cursor"),
        (world.get("/v1/usage/daily", key, start="2026-02-30"), 400, "start"),
        (world.get("/v1/usage/daily", key, start="2026-03-02", end="2026-03-01"), 400, "start"),
        (world.admin("GET", "/admin/usage/daily?user_id=nobody"), 404, None),
        (world.admin("GET", "/admin/users/nobody/requests"), 404, None),
        (httpx.get(world.url + "/dashboard/static/../../app.py"), 404, None),
        (httpx.get(world.url + "/dashboard/nothing-here"), 404, None),
    ]
    for r, status, param in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert r.json()["error"].get("param") == param, (r.request.url, r.text)
    # The live counts: model routes only (the calls above, the dashboard's own, are not traffic).
    live = world.admin("GET", "/admin/live").json()
    assert (live["in_flight"], live["requests"], live["tokens"]) == (0, {"2xx": 0, "4xx": 0, "5xx": 0}, 0), live
    client = world.client(key)
    usage = client.chat.completions.create(model="llama3.2:1b", messages=[{"role": "user", "content": "Hi"}]).usage
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama3.2:1b", messages=[])
    world.settle_all()
    live = world.admin("GET", "/admin/live").json()
    assert (live["requests"], live["tokens"]) == ({"2xx": 1, "4xx": 1, "5xx": 0}, usage.total_tokens), live
    assert live["latency"]["count"] == 2 and live["latency"]["buckets"][-1] == [None, 2], live
    off = make_world(config={"metrics.enabled": False})
    r = off.admin("GET", "/admin/live")
    assert r.status_code == 404 and r.json()["error"]["code"] == "metrics_disabled"
