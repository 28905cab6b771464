// The user view: the caller's own usage, limits, invoice and requests, read with their API key.
"use strict";

(() => {
  const { el, api, int, usd, time } = PD;
  const $ = (id) => document.getElementById(id);
  let key = null;
  let daily = null;   // this month's /v1/usage/daily answer (the CSV is made from it)
  let limits = [];
  const pages = [null];  // cursors of the pages seen: pages[i] is the cursor that reads page i
  let page = 0;

  async function load() {
    const m = PD.month(new Date());
    const [usage, lim, invoice] = await Promise.all([
      api(key, "GET", `/v1/usage/daily?start=${m.start}&end=${m.end}`),
      api(key, "GET", "/v1/limits"),
      api(key, "GET", `/v1/billing/invoices?period=${m.period}`),
    ]);
    daily = usage;
    $("who").textContent = usage.user_id;
    $("month-title").textContent = `This month (${m.period})`;
    const t = usage.totals;
    $("totals").replaceChildren(
      tile("Requests", int(t.requests), "requests"), tile("Prompt tokens", int(t.prompt_tokens), "prompt"),
      tile("Completion tokens", int(t.completion_tokens), "completion"), tile("Total tokens", int(t.total_tokens), "tokens"),
      tile("Cost", usd(t.cost_usd), "cost"));
    PD.dailyChart($("chart-tokens"), m.days, usage.data, "total_tokens", false);
    PD.dailyChart($("chart-cost"), m.days, usage.data, "cost_usd", true);
    limits = lim.limits;
    drawLimits();
    drawInvoice(invoice);
    await loadRequests();
  }

  const tile = (k, v, id) => el("div", { class: "tile", "data-tile": id }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));

  function limitLabel(l) {
    return l.name.replace(/_/g, " ") + (l.model ? ` (${l.model})` : "");
  }

  function drawLimits() {
    const now = Date.now();
    if (!limits.length) { $("limits").replaceChildren(el("p", {}, "No limits apply to you.")); return; }
    const money = (l) => l.name.endsWith("_usd");
    const fmt = (l, v) => (money(l) ? usd(v) : int(v));
    $("limits").replaceChildren(
      el("p", { class: "legend" }, el("span", { class: "sw used" }), "used", el("span", { class: "sw reserved" }), "reserved (running requests)",
        el("span", { class: "sw free" }), "remaining"),
      ...limits.map((l) => {
        const total = Number(l.limit), used = Number(l.used), reserved = Number(l.reserved);
        const exhausted = Number(l.remaining) <= 0;
        const bar = el("div", { class: "meter", role: "img",
          "aria-label": `${limitLabel(l)}: ${fmt(l, l.used)} used, ${fmt(l, l.reserved)} reserved, ${fmt(l, l.remaining)} remaining of ${fmt(l, l.limit)}` },
        el("div", { class: "used" }), el("div", { class: "reserved" }));
        // Widths through the CSSOM (allowed by the CSP, unlike a style attribute).
        const pct = (v) => (total > 0 ? Math.min(100, (100 * v) / total) : (exhausted ? 100 : 0)) + "%";
        bar.children[0].style.width = pct(used);
        bar.children[1].style.width = pct(Math.min(reserved, Math.max(0, total - used)));
        const reset = el("span", { class: "reset", "data-reset": l.resets_at || "", "data-kind": l.name });
        return el("div", { class: "limit" + (exhausted ? " exhausted" : ""), "data-limit": l.name, "data-model": l.model || "" },
          el("div", { class: "limit-head" },
            el("span", { class: "name" }, limitLabel(l)),
            exhausted ? el("span", { class: "state" }, "exhausted") : null,
            el("span", {}, `${fmt(l, l.used)} used · ${fmt(l, l.reserved)} reserved · ${fmt(l, l.remaining)} remaining of ${fmt(l, l.limit)}`)),
          bar, el("div", { class: "legend" }, reset));
      }));
    tick(now);
  }

  function tick(now) {
    for (const node of document.querySelectorAll("[data-reset]")) {
      const at = node.getAttribute("data-reset");
      const kind = node.getAttribute("data-kind");
      node.textContent = at ? `resets in ${PD.duration(Date.parse(at) - now)} (${time(at)})`
        : kind === "max_concurrent_requests" ? "requests running at once" : "never resets";
    }
  }

  function drawInvoice(inv) {
    const rows = inv.lines.map((l) => ({ ...l }));
    rows.push({ model: "Total", _class: "total", requests: rows.reduce((a, r) => a + r.requests, 0),
      prompt_tokens: rows.reduce((a, r) => a + r.prompt_tokens, 0), completion_tokens: rows.reduce((a, r) => a + r.completion_tokens, 0),
      cost_usd: inv.total_usd });
    PD.table($("invoice"), [
      ["Model", (r) => r.model, "text"],
      ["Price in / out per 1M", (r) => (r.input_per_million_usd ? `${usd(r.input_per_million_usd)} / ${usd(r.output_per_million_usd)}` : ""), "num"],
      ["Requests", (r) => int(r.requests), "num"], ["Prompt", (r) => int(r.prompt_tokens), "num"],
      ["Completion", (r) => int(r.completion_tokens), "num"], ["Cost", (r) => usd(r.cost_usd), "num"],
    ], rows);
    $("invoice-title").textContent = `Invoice ${inv.period}, month to date (${inv.status})`;
  }

  async function loadRequests() {
    const cursor = pages[page];
    const r = await api(key, "GET", "/v1/requests?limit=20" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    pages[page + 1] = r.next_cursor;
    PD.table($("requests"), [
      ["Time", (x) => time(x.created_at)], ["Model", (x) => x.model, "text"], ["Endpoint", (x) => x.endpoint, "text"],
      ["Prompt", (x) => int(x.prompt_tokens), "num"], ["Completion", (x) => int(x.completion_tokens), "num"],
      ["Cost", (x) => usd(x.cost_usd), "num"], ["Status", (x) => `${x.status}${x.http_status ? " " + x.http_status : ""}`],
      ["Latency", (x) => (x.latency_ms === null ? "—" : `${int(x.latency_ms)} ms`), "num"],
    ], r.data, "No requests yet.");
    $("newer").disabled = page === 0;
    $("older").disabled = !r.next_cursor;
  }

  function exportCsv() {
    if (!daily) return;
    const rows = daily.data.map((r) => [r.day, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens, r.cost_usd]);
    const text = PD.csv(["day", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd"], rows);
    PD.download(`proxyd-usage-${daily.user_id}-${daily.start.slice(0, 7)}.csv`, text, "text/csv");
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("older").addEventListener("click", () => { page += 1; loadRequests().catch(PD.fail); });
    $("newer").addEventListener("click", () => { page = Math.max(0, page - 1); loadRequests().catch(PD.fail); });
    $("csv").addEventListener("click", exportCsv);
    setInterval(() => tick(Date.now()), 1000);
    // The limits move with every request (reservations while one runs): re-read them every 15 s.
    setInterval(() => {
      if (key) api(key, "GET", "/v1/limits").then((r) => { limits = r.limits; drawLimits(); }).catch(PD.fail);
    }, 15000);
    PD.signIn({
      storeKey: "proxyd.user_key",
      check: (token) => api(token, "GET", "/v1/limits"),
      start: async (token) => { key = token; await load().catch(PD.fail); },
    });
  });
})();
