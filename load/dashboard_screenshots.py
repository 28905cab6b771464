"""The README's dashboard screenshots (docs/dashboard-user.png, docs/dashboard-admin.png) from a demo world.

    python -m load.dashboard_screenshots [--out docs]

A proxy in front of the bundled Ollama emulator (tests/harness.py), three users making requests through the
openai SDK on each day of this month so far (the harness's clock is moved forward a day at a time, so the
ledger holds them on those days), limits on one of them; then Debian's Chromium (Playwright,
/usr/bin/chromium) signs in to both views at 1280x800 and saves full-page screenshots. The browser tests
(tests/test_dashboard.py) check the same pages; this only makes pictures with more days in them.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import ADMIN_TOKEN, Harness  # noqa: E402

PRICING = {"default": {"input_per_million_usd": 0.5, "output_per_million_usd": 1.5},
           "moondream": {"input_per_million_usd": 2, "output_per_million_usd": 6}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"))
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rnd = random.Random(17)
    with tempfile.TemporaryDirectory() as tmp:
        world = Harness(str(Path(tmp) / "demo.db"), config={"pricing": PRICING}).start()
        try:
            keys = {u: world.new_user(u) for u in ("alice", "bob", "carol")}
            world.admin("PUT", "/admin/users/alice/limits", {"tokens_per_day": 3000, "requests_per_minute": 30,
                                                            "cost_per_month_usd": "0.05"})
            clients = {u: world.client(k) for u, k in keys.items()}
            days_back = min(time.gmtime().tm_mday - 1, 14)
            world.clock.advance(-days_back * 86400)
            for day in range(days_back, -1, -1):
                for user, client in clients.items():
                    for _ in range(rnd.randint(1, 4)):
                        model = rnd.choice(["llama3.2:1b", "llama3.2:1b", "moondream"])
                        text = "Tell me about " + " ".join(rnd.choice(["proxies", "tokens", "llamas", "limits"])
                                                           for _ in range(rnd.randint(3, 30)))
                        client.chat.completions.create(model=model, max_tokens=rnd.randint(20, 120),
                                                       messages=[{"role": "user", "content": text}])
                    if user != "alice" and rnd.random() < 0.5:
                        client.embeddings.create(model="nomic-embed-text", input=["hello"] * rnd.randint(1, 20))
                if day:
                    world.clock.advance(86400)
                    time.sleep(0.05)
            world.settle_all()
            stop = threading.Event()

            def traffic() -> None:  # for the live tiles
                while not stop.is_set():
                    clients["bob"].chat.completions.create(model="llama3.2:1b", max_tokens=40,
                                                           messages=[{"role": "user", "content": "Hi"}])
                    time.sleep(0.1)

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
                page.goto(world.url + "/dashboard")
                page.fill("#key", keys["alice"])
                page.click("#signin-submit")
                page.wait_for_selector("#requests td")
                page.screenshot(path=str(Path(a.out) / "dashboard-user.png"), full_page=True)
                page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
                thread = threading.Thread(target=traffic, daemon=True)
                thread.start()
                page.goto(world.url + "/dashboard/admin")
                page.fill("#key", ADMIN_TOKEN)
                page.click("#signin-submit")
                page.wait_for_selector("[data-tile=rps]", timeout=15000)
                page.click("[data-limits=alice]")
                page.wait_for_selector("#limits-form:not([hidden])")
                page.screenshot(path=str(Path(a.out) / "dashboard-admin.png"), full_page=True)
                stop.set()
                thread.join(10)
                browser.close()
        finally:
            world.close()
    print(f"wrote {a.out}/dashboard-user.png and {a.out}/dashboard-admin.png")


if __name__ == "__main__":
    main()
