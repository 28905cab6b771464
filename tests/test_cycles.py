"""A finished request is freed by reference counting, not left to the cyclic garbage collector.

From 7317ce1 to 5395e02 the handler kept its MeteredCall (``self.call``) and the call kept the handler
(its sink): every request left its handler, HTTP request, connection objects, call and upstream response
(~60 objects) for the collector, which cost +12% CPU per request in the throughput bench while the
Python call count did not move. This test counts what a collection finds: a fact, not a time.
"""

from __future__ import annotations

import gc

from proxyd.handlers.base import BaseHandler
from proxyd.pipeline import MeteredCall

MSG = [{"role": "user", "content": "Hello there"}]


def _proxy_garbage(ctx) -> dict[str, int]:
    """Handlers and calls of this proxy (``ctx``) that a collection found. Only this proxy's: a proxy of an
    earlier test in the same process can let go of a request of its own while this one runs (a timer of
    a cut-off test firing late), and that request is no finding about the requests made here. (On
    2026-11-30 a CI run found one handler and one call, which did not recur in 11 runs alone or under
    CPU load; where they came from was not established, and this filter rules out that explanation.)"""
    gc.collect()
    found: dict[str, int] = {}
    for obj in gc.garbage:
        if isinstance(obj, (BaseHandler, MeteredCall)) and getattr(obj, "ctx", None) is ctx:
            found[type(obj).__name__] = found.get(type(obj).__name__, 0) + 1
    return found


def test_finished_requests_leave_no_cycles_for_the_collector(world):
    key = world.new_user("alice")
    client = world.client(key)
    client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=8)  # warm-up: lazy state
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(flags | gc.DEBUG_SAVEALL)  # keep what a collection finds in gc.garbage, to look at it
    try:
        del gc.garbage[:]
        for _ in range(5):
            client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=8)
            for _chunk in client.chat.completions.create(model="llama3.2:1b", messages=MSG, max_tokens=8,
                                                         stream=True, stream_options={"include_usage": True}):
                pass
            client.completions.create(model="llama3.2:1b", prompt="Hi", max_tokens=8)
            client.embeddings.create(model="llama3.2:1b", input="Hi")
        found = _proxy_garbage(world.ctx)
    finally:
        gc.set_debug(flags)
        del gc.garbage[:]
    assert found == {}, f"requests left for the cyclic collector: {found}"
