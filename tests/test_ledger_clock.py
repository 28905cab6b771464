"""The injected clock stamps every time the ledger and the accounts record, and decides "today" and "this
month" for usage and invoices: a proxy whose clock says 15 February 2031 bills, reports and invoices as on
that day, whatever the machine's date."""

from __future__ import annotations

import calendar
import time

from tests.harness import Harness

MSG = [{"role": "user", "content": "Hi"}]
NOON = calendar.timegm((2031, 2, 15, 12, 0, 0))  # a Saturday; years from any date the suite runs on


def test_ledger_rows_usage_and_invoices_follow_the_injected_clock(tmp_path, backend_config):
    world = Harness(str(tmp_path / "ledger.db"), config=backend_config)
    world.clock.offset = NOON - time.time()  # the fake clock reads 2031-02-15T12:00:00Z from here on
    world.start()
    try:
        key = world.new_user("alice")
        assert world.admin("GET", "/admin/users/alice").json()["created_at"].startswith("2031-02-15T12:")

        world.client(key).chat.completions.create(model="llama3.2:1b", messages=MSG)
        world.settle_all()
        [(status, day, created, finished)] = world.rows("SELECT status, day, created_at, finished_at FROM requests")
        assert (status, day) == ("settled", "2031-02-15")
        assert created.startswith("2031-02-15T12:") and finished.startswith("2031-02-15T12:") and created <= finished

        # /v1/usage by default: this month so far, by the clock.
        usage = world.get("/v1/usage", key).json()
        assert (usage["start"], usage["end"], usage["totals"]["requests"]) == ("2031-02-01", "2031-02-15", 1)

        # The clock's month is open, the one before it closed, and so is the machine's own month (long past).
        def invoice(**params):
            r = world.get("/v1/billing/invoices", key, **params)
            assert r.status_code == 200, r.text
            return r.json()

        assert (invoice(period="2031-02")["status"], invoice(period="2031-02")["total_usd"]) == ("open", "0.000000000")
        assert invoice(period="2031-01")["status"] == "closed"
        assert invoice()["period"] == "2031-01"  # by default the last closed month
        assert invoice(period=time.strftime("%Y-%m", time.gmtime()))["status"] == "closed"

        # Into March: February's invoice closes, the default usage range moves, the admin view agrees.
        world.clock.advance(15 * 86400)
        assert invoice(period="2031-02")["status"] == "closed"
        assert invoice()["period"] == "2031-02" and len(invoice()["lines"]) == 1
        usage = world.get("/v1/usage", key).json()
        assert (usage["start"], usage["end"], usage["totals"]["requests"]) == ("2031-03-01", "2031-03-02", 0)
        r = world.admin("GET", "/admin/invoices?period=2031-02")
        assert [(i["user_id"], i["status"]) for i in r.json()["data"]] == [("alice", "closed")]

        # A row a crash left pending is expired at the next start, stamped by the clock too.
        world.execute("INSERT INTO requests (id, user_id, key_id, model, endpoint, stream, status, day, created_at)"
                      " VALUES ('req_crashed', 'alice', 'k', 'llama3.2:1b', 'chat.completions', 0, 'pending',"
                      " '2031-03-02', '2031-03-02T12:00:00.000Z')")
        world.restart()
        [(status, finished)] = world.rows("SELECT status, finished_at FROM requests WHERE id = 'req_crashed'")
        assert status == "expired" and finished.startswith("2031-03-02T12:")
    finally:
        world.close()
