// proxyd dashboard: helpers shared by the user and the admin view. Plain script, no build step.
// Every string that came from a client or the API reaches the page as a text node (el() below,
// textContent): never innerHTML, so markup in a user id or a model name renders as text.
"use strict";

const PD = (() => {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(e.message || `HTTP ${status}`);
      this.status = status;
      this.param = e.param || null;
      this.code = e.code || null;
    }
  }

  // The credential goes in the Authorization header only: never in a URL (logs, history, Referer) or a cookie.
  async function api(token, method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + token }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  const int = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));
  // USD arrives as a decimal string with 9 decimals: shown with up to 6, trailing zeros trimmed to 2.
  function usd(s) {
    if (s === null || s === undefined) return "—";
    const [w, f = ""] = String(s).split(".");
    let frac = f.slice(0, 6).replace(/0+$/, "");
    if (frac.length < 2) frac = frac.padEnd(2, "0");
    return "$" + w + "." + frac;
  }
  const isZero = (v) => Number(v) === 0;
  const time = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, "") + " UTC" : "—");

  function duration(ms) {
    if (ms <= 0) return "now";
    const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600),
      m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m ${sec}s`;
    return `${m}m ${sec}s`;
  }

  // This UTC month: its first and last day and every day in between (the chart's x axis).
  function month(now) {
    const y = now.getUTCFullYear(), mo = now.getUTCMonth();
    const n = new Date(Date.UTC(y, mo + 1, 0)).getUTCDate();
    const pad = (v) => String(v).padStart(2, "0");
    const days = Array.from({ length: n }, (_, i) => `${y}-${pad(mo + 1)}-${pad(i + 1)}`);
    return { period: `${y}-${pad(mo + 1)}`, start: days[0], end: days[n - 1], days };
  }

  const PALETTE = ["#1f5fbf", "#e0a526", "#2a9d8f", "#b42318", "#7b4fbf", "#5b6470", "#d65db1", "#3c8d2f"];

  // Stacked bars per day and model; ``field`` picks the figure. The chart is redrawn in place on reload.
  function dailyChart(canvas, days, rows, field, money) {
    const models = [...new Set(rows.map((r) => r.model))].sort();
    const index = new Map(days.map((d, i) => [d, i]));
    const datasets = models.map((m, i) => {
      const data = new Array(days.length).fill(0);
      for (const r of rows) if (r.model === m && index.has(r.day)) data[index.get(r.day)] += Number(r[field]);
      return { label: m, data, backgroundColor: PALETTE[i % PALETTE.length], stack: "s" };
    });
    const labels = days.map((d) => d.slice(8));
    const old = window.Chart.getChart(canvas);
    if (old) {
      old.data.labels = labels;
      old.data.datasets = datasets;
      old.update("none");
      return old;
    }
    return new window.Chart(canvas, {
      type: "bar",
      data: { labels, datasets },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true,
          ticks: { callback: (v) => (money ? "$" + v : Number(v).toLocaleString("en-US")) } } },
        plugins: { legend: { position: "bottom" },
          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${money ? "$" + c.parsed.y.toFixed(6) : int(c.parsed.y)}` } } },
      },
    });
  }

  // A table from column specs: [header, (row) => value, "num"|"text"|undefined].
  function table(node, columns, rows, empty) {
    const head = el("thead", {}, el("tr", {}, columns.map(([h, , cls]) => el("th", { class: cls, scope: "col" }, h))));
    const body = el("tbody", {}, rows.length ? rows.map((r) => el("tr", { class: r._class },
      columns.map(([h, f, cls]) => el("td", { class: cls, "data-label": h }, f(r))))) : el("tr", {}, el("td", { colspan: columns.length }, empty || "None.")));
    node.classList.add("stack");  // on a narrow screen each row becomes a block of "header: value" lines
    node.replaceChildren(head, body);
  }

  // CSV of rows; a cell starting with = + - @ (a spreadsheet formula) gets a leading quote.
  function csv(header, rows) {
    const cell = (v) => {
      let s = v === null || v === undefined ? "" : String(v);
      if (/^[=+\-@\t\r]/.test(s)) s = "'" + s;
      return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
    };
    return [header, ...rows].map((r) => r.map(cell).join(",")).join("\r\n") + "\r\n";
  }

  function download(name, text, type) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = el("a", { href: url, download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // Sign-in shared by both views: the credential lives in this tab's sessionStorage under ``storeKey``.
  // ``check(token)`` proves it (an API call); on success ``start(token, first)`` draws the view.
  function signIn({ storeKey, check, start }) {
    const form = document.getElementById("signin-form"), input = document.getElementById("key"),
      error = document.getElementById("signin-error"), signin = document.getElementById("signin"),
      app = document.getElementById("app"), out = document.getElementById("signout");
    const show = (signedIn) => { signin.hidden = signedIn; app.hidden = !signedIn; out.hidden = !signedIn; };
    async function attempt(token) {
      error.textContent = "";
      try {
        const first = await check(token);
        sessionStorage.setItem(storeKey, token);
        show(true);
        await start(token, first);
      } catch (e) {
        sessionStorage.removeItem(storeKey);
        show(false);
        error.textContent = e.message;
        input.focus();
      }
    }
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      input.value = "";
      if (!token) { error.textContent = "Enter it first."; input.focus(); return; }
      attempt(token);
    });
    out.addEventListener("click", () => { sessionStorage.removeItem(storeKey); location.reload(); });
    const saved = sessionStorage.getItem(storeKey);
    if (saved) attempt(saved); else { show(false); input.focus(); }
  }

  function fail(e) {
    const node = document.getElementById("app-error");
    if (node) node.textContent = e && e.message ? e.message : String(e);
  }

  return { el, api, ApiError, int, usd, isZero, time, duration, month, dailyChart, table, csv, download, signIn, fail };
})();
