// The admin view: users, keys, limit overrides, usage of everyone and live tiles, with the admin token.
// Without the token the page holds nothing: every figure is fetched with it, none is in the page.
"use strict";

(() => {
  const { el, api, int, usd, time } = PD;
  const $ = (id) => document.getElementById(id);
  let token = null;
  let editing = null;  // the user whose limit overrides the form shows
  let previous = null;  // the last /admin/live snapshot
  const LIMITS = ["requests_per_minute", "tokens_per_minute", "requests_per_day", "tokens_per_day", "tokens_per_month",
    "cost_per_day_usd", "cost_per_month_usd", "total_tokens", "total_cost_usd", "max_concurrent_requests"];
  const call = (method, path, body) => api(token, method, path, body);

  async function loadUsers() {
    const r = await call("GET", "/admin/overview");
    PD.table($("users"), [
      ["User", (u) => u.user_id, "text"],
      ["Status", (u) => el("span", { class: "badge" + (u.disabled ? " off" : "") }, u.disabled ? "disabled" : "active")],
      ["Requests", (u) => int(u.month_to_date.requests), "num"], ["Tokens", (u) => int(u.month_to_date.total_tokens), "num"],
      ["Cost", (u) => usd(u.month_to_date.cost_usd), "num"], ["Last request", (u) => time(u.last_request_at)],
      ["Keys", (u) => el("ul", { class: "keys" }, u.keys.map((k) => el("li", {}, el("code", {}, k.prefix + "…"), " ",
        k.revoked_at ? el("span", { class: "badge off" }, "revoked")
          : el("button", { type: "button", class: "danger", "data-revoke": k.key_id, onclick: () => revoke(u.user_id, k) }, "Revoke"))))],
      ["Actions", (u) => [
        el("button", { type: "button", class: "plain", "data-addkey": u.user_id, onclick: () => addKey(u.user_id) }, "Add key"),
        el("button", { type: "button", class: "plain", "data-toggle": u.user_id, onclick: () => toggle(u) }, u.disabled ? "Enable" : "Disable"),
        el("button", { type: "button", class: "plain", "data-limits": u.user_id, onclick: () => editLimits(u.user_id) }, "Limits"),
      ]],
    ], r.data.map((u) => ({ ...u, _class: u.disabled ? "disabled" : undefined })), "No users yet.");
  }

  function showKey(userId, key) {
    $("newkey-user").textContent = userId;
    $("newkey-value").textContent = key;
    $("newkey").hidden = false;
    $("newkey-copy").focus();
  }

  async function addKey(userId) {
    try {
      const r = await call("POST", `/admin/users/${encodeURIComponent(userId)}/keys`);
      showKey(userId, r.api_key);
      await loadUsers();
    } catch (e) { PD.fail(e); }
  }

  async function revoke(userId, k) {
    if (!confirm(`Revoke key ${k.prefix}… of ${userId}? Its running requests end now.`)) return;
    try { await call("DELETE", `/admin/keys/${encodeURIComponent(k.key_id)}`); await loadUsers(); } catch (e) { PD.fail(e); }
  }

  async function toggle(u) {
    try {
      await call("PATCH", `/admin/users/${encodeURIComponent(u.user_id)}`, { disabled: !u.disabled });
      await loadUsers();
    } catch (e) { PD.fail(e); }
  }

  async function create(ev) {
    ev.preventDefault();
    const input = $("create-user"), err = $("create-user-error");
    err.textContent = "";
    try {
      const r = await call("POST", "/admin/users", { user_id: input.value });
      input.value = "";
      showKey(r.user_id, r.api_key);
      await loadUsers();
    } catch (e) {
      err.textContent = e.message;  // the API's own message (it names user_id)
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
  }

  // Limit overrides: one field per limit. Empty inherits; "null" is unlimited; anything else is sent as the
  // API takes it (a number when it reads as one, else the text), so the API's validation speaks, next to the field.
  async function editLimits(userId) {
    try {
      const r = await call("GET", `/admin/users/${encodeURIComponent(userId)}/limits`);
      editing = userId;
      $("limits-user").textContent = userId;
      const o = r.overrides || {};
      const eff = r.effective || {};
      $("limits-fields").replaceChildren(
        ...LIMITS.map((name) => el("div", {},
          el("label", { for: "lim-" + name }, name),
          el("input", { id: "lim-" + name, "data-name": name, autocomplete: "off", "aria-describedby": "lim-" + name + "-error",
            placeholder: "inherit: " + (eff[name] === undefined || eff[name] === null ? "unlimited" : eff[name]),
            value: name in o ? (o[name] === null ? "null" : String(o[name])) : "" }),
          el("p", { class: "error", id: "lim-" + name + "-error", role: "alert" }))),
        el("div", {},
          el("label", { for: "lim-models" }, "models (JSON, per-model limits)"),
          el("textarea", { id: "lim-models", "data-name": "models", rows: 3, "aria-describedby": "lim-models-error" },
            o.models ? JSON.stringify(o.models) : ""),
          el("p", { class: "error", id: "lim-models-error", role: "alert" })));
      $("limits-form").hidden = false;
      $("limits-hint").hidden = true;
      $("limits-error").textContent = "";
      $("lim-" + LIMITS[0]).focus();
    } catch (e) { PD.fail(e); }
  }

  function limitsBody() {
    const body = {};
    for (const input of $("limits-fields").querySelectorAll("[data-name]")) {
      const name = input.getAttribute("data-name"), v = input.value.trim();
      if (v === "") continue;
      if (name === "models") {
        try { body.models = JSON.parse(v); } catch (_) { body.models = v; }  // the API says what is wrong
      } else if (v === "null") body[name] = null;
      else if (/^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$/.test(v) && !name.endsWith("_usd")) body[name] = Number(v);
      else body[name] = v;  // USD as the decimal string typed (exact), or text the API refuses
    }
    return body;
  }

  async function saveLimits(ev) {
    ev.preventDefault();
    for (const p of $("limits-fields").querySelectorAll(".error")) p.textContent = "";
    for (const i of $("limits-fields").querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
    $("limits-error").textContent = "";
    try {
      await call("PUT", `/admin/users/${encodeURIComponent(editing)}/limits`, limitsBody());
      $("limits-error").textContent = "";
      await editLimits(editing);
      $("limits-error").textContent = "";
      const saved = el("span", { role: "status" }, "Saved.");
      $("limits-error").replaceChildren();
      $("limits-form").querySelector("button[type=submit]").after(saved);
      setTimeout(() => saved.remove(), 3000);
    } catch (e) {
      // param is "limits.<field>" or "limits.models..." : the message goes next to that field.
      const field = e.param && e.param.startsWith("limits.") ? e.param.slice(7).split(".")[0] : null;
      const target = field && document.getElementById("lim-" + field + "-error");
      if (target) {
        target.textContent = e.message;
        document.getElementById("lim-" + field).setAttribute("aria-invalid", "true");
        document.getElementById("lim-" + field).focus();
      } else $("limits-error").textContent = e.message;
    }
  }

  async function clearLimits() {
    try { await call("DELETE", `/admin/users/${encodeURIComponent(editing)}/limits`); await editLimits(editing); } catch (e) { PD.fail(e); }
  }

  async function loadUsage() {
    const m = PD.month(new Date());
    const [daily, byModel] = await Promise.all([
      call("GET", `/admin/usage/daily?start=${m.start}&end=${m.end}`),
      call("GET", `/admin/usage?group_by=model&start=${m.start}&end=${m.end}`),
    ]);
    PD.dailyChart($("chart-tokens"), m.days, daily.data, "total_tokens", false);
    PD.dailyChart($("chart-cost"), m.days, daily.data, "cost_usd", true);
    PD.table($("by-model"), [
      ["Model", (r) => r.model, "text"], ["Requests", (r) => int(r.requests), "num"],
      ["Prompt", (r) => int(r.prompt_tokens), "num"], ["Completion", (r) => int(r.completion_tokens), "num"],
      ["Cost", (r) => usd(r.cost_usd), "num"],
    ], byModel.data, "No usage this month.");
  }

  // Live tiles: the difference of two cumulative snapshots, so rates cover the last interval.
  function quantile(buckets, q) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!total) return null;
    let prevLe = 0, prevN = 0;
    for (const [le, n] of buckets) {
      if (n >= q * total) {
        if (le === null) return prevLe;  // in the +Inf bucket: at least the last bound
        return prevLe + (le - prevLe) * ((q * total - prevN) / Math.max(1, n - prevN));
      }
      prevLe = le; prevN = n;
    }
    return prevLe;
  }

  async function live() {
    let s;
    try { s = await call("GET", "/admin/live"); } catch (e) {
      $("live-note").textContent = e.message;
      return;
    }
    const tiles = [];
    const tile = (k, v, id) => el("div", { class: "tile", "data-tile": id }, el("div", { class: "v" }, v), el("div", { class: "k" }, k));
    if (previous) {
      const dt = Math.max(0.001, s.time - previous.time);
      const sum = (x) => x.requests["2xx"] + x.requests["4xx"] + x.requests["5xx"];
      const n = sum(s) - sum(previous);
      const errors = s.requests["4xx"] + s.requests["5xx"] - previous.requests["4xx"] - previous.requests["5xx"];
      const buckets = s.latency.buckets.map(([le, c], i) => [le, c - ((previous.latency.buckets[i] || [le, 0])[1])]);
      const ms = (v) => (v === null ? "—" : `${(v * 1000).toFixed(v < 0.01 ? 1 : 0)} ms`);
      tiles.push(tile("Requests/s", (n / dt).toFixed(2), "rps"),
        tile("Error rate (4xx+5xx)", n ? `${((100 * errors) / n).toFixed(1)}%` : "—", "errors"),
        tile("In flight", int(s.in_flight), "inflight"),
        tile("p50 latency", ms(quantile(buckets, 0.5)), "p50"), tile("p99 latency", ms(quantile(buckets, 0.99)), "p99"),
        tile("Tokens/s", ((s.tokens - previous.tokens) / dt).toFixed(1), "tps"));
      $("live-note").textContent = `last ${dt.toFixed(0)} s, refreshed every 3 s`;
    } else {
      tiles.push(tile("In flight", int(s.in_flight), "inflight"));
      $("live-note").textContent = "measuring…";
    }
    previous = s;
    $("live").replaceChildren(...tiles);
  }

  async function start(t, first) {
    token = t;
    await Promise.all([loadUsers(), loadUsage()]).catch(PD.fail);
    await live();
    setInterval(live, 3000);
    setInterval(() => Promise.all([loadUsers(), loadUsage()]).catch(PD.fail), 30000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("create-form").addEventListener("submit", create);
    $("limits-form").addEventListener("submit", saveLimits);
    $("limits-clear").addEventListener("click", clearLimits);
    $("newkey-copy").addEventListener("click", async () => {
      const text = $("newkey-value").textContent;
      try { await navigator.clipboard.writeText(text); $("newkey-copy").textContent = "Copied"; } catch (_) {
        getSelection().selectAllChildren($("newkey-value"));  // no clipboard access: selected, ready for Ctrl+C
      }
    });
    $("newkey-done").addEventListener("click", () => {
      $("newkey").hidden = true;
      $("newkey-value").textContent = "";
      $("newkey-copy").textContent = "Copy";
    });
    PD.signIn({ storeKey: "proxyd.admin_token", check: (t) => api(t, "GET", "/admin/overview"), start });
  });
})();
