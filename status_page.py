"""The browser status page served at ``/``: one self-contained HTML document that reads /status.

Everything is inline (no CDN, fonts or images), so the page works on an air-gapped terminal.
The script fetches ``status`` relative to the page (``/status`` when served at ``/``; a path
prefix behind a proxy keeps working), re-renders every 5 s, and on a 401 asks for the
LOCAL_API_TOKEN, which it keeps in ``sessionStorage`` (gone when the tab closes) and sends as
``Authorization: Bearer``. The dead-letter table's "retry" and "drop" buttons ask ``confirm()``
first, then send ``POST outbox/{id}/retry`` or ``DELETE outbox/{id}`` with the same token.
Server text reaches the page only through ``textContent``/``append``;
the page never parses server strings as HTML. A Content-Security-Policy with the hashes of the
one inline script and style forbids any other script, style, frame or outside connection.
"""

from __future__ import annotations

import base64
import functools
import hashlib

REFRESH_S = 5

_STYLE = """
:root { color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --fg: #1b1f24; --muted: #5f6b7a;
  --line: #dde2e8; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e; --info: #0969da;
  --bar: #e6e9ee; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1216; --card: #171b21; --fg: #e6e9ee; --muted: #9aa5b1; --line: #2a313a;
    --ok: #3fb950; --warn: #d29922; --bad: #f85149; --info: #58a6ff; --bar: #2a313a; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 10px 16px;
  padding: 14px 20px; border-bottom: 1px solid var(--line); background: var(--card); }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 13px; margin: 0 0 10px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
.badges { display: flex; flex-wrap: wrap; gap: 6px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px;
  font-weight: 600; border: 1px solid currentColor; white-space: nowrap; }
.b-ok { color: var(--ok); } .b-warn { color: var(--warn); } .b-bad { color: var(--bad); }
.b-info { color: var(--info); } .b-muted { color: var(--muted); }
.muted { color: var(--muted); }
#updated { margin-left: auto; font-size: 12px; }
.banner { margin: 12px 20px 0; padding: 10px 14px; border-radius: 6px;
  border: 1px solid var(--bad); color: var(--bad); background: var(--card); }
[hidden] { display: none !important; }
main { display: grid; gap: 14px; padding: 14px 20px 24px; grid-template-columns: 1fr;
  grid-auto-flow: row dense; }
@media (min-width: 760px) { main { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
@media (min-width: 1200px) { main { grid-template-columns: repeat(3, minmax(0, 1fr)); }
  .wide.span2 { grid-column: span 2; } }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; min-width: 0; }
.wide { grid-column: 1 / -1; }
form.card { max-width: 460px; margin: 24px 20px; display: grid; gap: 10px; }
input { font: inherit; padding: 6px 8px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--bg); color: var(--fg); }
button { font: inherit; padding: 6px 12px; border-radius: 6px; border: 1px solid var(--info);
  background: var(--info); color: #fff; cursor: pointer; justify-self: start; }
.error { color: var(--bad); margin: 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; overflow-wrap: break-word; }
th, td.num { white-space: nowrap; }
th { font-weight: 600; color: var(--muted); font-size: 12px; }
td.num, th.num { text-align: right; }
.scroll { overflow-x: auto; }
.big { font-size: 22px; font-weight: 650; }
.bar { position: relative; height: 14px; border-radius: 7px; background: var(--bar);
  overflow: hidden; margin: 10px 0 6px; }
.fill { position: absolute; top: 0; bottom: 0; }
.fill.spent { left: 0; background: var(--ok); }
.fill.spent.warn { background: var(--warn); } .fill.spent.bad { background: var(--bad); }
.fill.reserved { background: var(--info); opacity: .45; }
.marker { position: absolute; top: 0; bottom: 0; width: 2px; background: var(--fg); }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
.kv dt { color: var(--muted); } .kv dd { margin: 0; overflow-wrap: anywhere; }
p.note { margin: 8px 0 0; font-size: 12px; }
th.bad { color: var(--bad); }
table.dead tr.head td { border-bottom: 0; padding-bottom: 0; }
table.dead td.err { overflow-wrap: anywhere; color: var(--bad); }
td.acts { white-space: nowrap; text-align: right; }
td.acts button { padding: 1px 8px; font-size: 12px; margin: 0 0 0 4px; }
button.drop { background: transparent; color: var(--bad); border-color: var(--bad); }
code.id { font-size: 12px; }
"""

_SCRIPT = """
"use strict";
(function () {
  const REFRESH_MS = __REFRESH_MS__;
  const STATUS_URL = "status";
  const OUTBOX_URL = "outbox/";
  const TOKEN_KEY = "everreach.local_api_token";
  const SOURCES = ["local", "cloud", "local_fallback", "cache", "outbox"];
  let timer = null;
  let busy = false;  // one request at a time, however refresh() was triggered

  // Every server string goes through text nodes: append() of a string never parses HTML.
  function el(tag, cls, ...children) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  function put(id, ...nodes) { document.getElementById(id).replaceChildren(...nodes); }
  function badge(text, tone) { return el("span", "badge b-" + tone, text); }
  function obj(value) { return value && typeof value === "object" ? value : {}; }
  function usd(value) { return value === null || value === undefined ? "-" : "$" + value; }
  function num(value) { const n = Number(value); return Number.isFinite(n) ? n : 0; }
  function pct(part, whole) {
    if (!(whole > 0)) return part > 0 ? 100 : 0;
    return Math.max(0, Math.min(100, (part / whole) * 100));
  }
  function table(headers, rows, numeric) {
    const head = el("tr", null, ...headers.map((h, i) => el("th", numeric[i] ? "num" : null, h)));
    const body = rows.map((row) =>
      el("tr", null, ...row.map((cell, i) => el("td", numeric[i] ? "num" : null, cell))));
    return el("div", "scroll", el("table", null, el("thead", null, head),
                                  el("tbody", null, ...body)));
  }
  function kv(pairs) {
    const list = el("dl", "kv");
    for (const [key, value] of pairs) list.append(el("dt", null, key), el("dd", null, value));
    return list;
  }
  function duration(seconds) {
    let s = Math.round(Math.abs(seconds));
    const parts = [];
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
      if (s >= size) { parts.push(Math.floor(s / size) + " " + unit); s %= size; }
    }
    if (parts.length < 2 && (s || !parts.length)) parts.push(s + " s");
    return parts.slice(0, 2).join(" ");
  }
  // "42 s ago" / "in 1 h"; the exact time is the tooltip.
  function when(iso) {
    if (!iso) return "-";
    const at = new Date(iso);
    if (Number.isNaN(at.getTime())) return String(iso);
    const delta = (at.getTime() - Date.now()) / 1000;
    const span = el("span", null, delta >= 0 ? "in " + duration(delta) : duration(delta) + " ago");
    span.title = at.toLocaleString();
    return span;
  }
  function shortId(id) {
    const text = String(id);
    const node = el("code", "id", text.length > 10 ? text.slice(0, 8) + "…" : text);
    node.title = text;
    return node;
  }
  function plural(n, noun) { return n + " " + noun + (n === 1 ? "" : "s"); }
  // A connectivity field for people: times relative, durations in units, yes/no.
  function shown(key, value) {
    if (value === null || value === undefined) return "-";
    if (key.endsWith("_at")) return when(value);
    if (key.endsWith("_s") && typeof value === "number") return duration(value);
    if (typeof value === "boolean") return value ? "yes" : "no";
    return typeof value === "object" ? JSON.stringify(value) : String(value);
  }
  function stateTone(state) {
    return state === "closed" ? "ok" : state === "open" ? "bad" : "warn";
  }

  function renderHeader(s) {
    const env = String(s.env || "?");
    const nodes = [badge("env " + env, env === "hybrid" ? "info" : "muted")];
    if (s.connectivity) {
      nodes.push(s.online ? badge("cloud online", "ok") : badge("cloud offline", "bad"));
    } else {
      nodes.push(badge(env === "cloud" ? "serving as the cloud" : "no cloud configured", "muted"));
    }
    if (s.offline_mode) nodes.push(badge("OFFLINE_MODE", "warn"));
    const cost = obj(s.cost);
    if (cost.hard_cap_reached) nodes.push(badge("hard cap reached", "bad"));
    else if (cost.soft_cap_reached) nodes.push(badge("soft cap reached", "warn"));
    const outbox = obj(s.outbox);
    const dead = num(outbox.dead_letters);
    if (dead > 0) nodes.push(badge(dead + (dead === 1 ? " dead letter" : " dead letters"), "bad"));
    const missing = Object.keys(obj(s.cloud_missing_handlers)).length;
    if (missing) nodes.push(badge("cloud lacks " + plural(missing, "handler"), "warn"));
    const holder = s.data_dir_shared_with;
    if (holder && typeof holder === "object") {
      nodes.push(badge("DATA_DIR shared with pid " + String(holder.pid ?? "?"), "warn"));
    }
    put("badges", ...nodes);
    put("updated", "v" + (s.version || "?") + " · up " + duration(num(s.uptime_sec)) +
        " · updated " + new Date().toLocaleTimeString() + " · refreshes every " +
        REFRESH_MS / 1000 + " s");
  }

  function renderCost(s) {
    const c = obj(s.cost);
    const spent = num(c.spent_usd), reserved = num(c.reserved_usd);
    const soft = num(c.soft_cap_usd), hard = num(c.hard_cap_usd);
    const tone = c.hard_cap_reached ? " bad" : c.soft_cap_reached ? " warn" : "";
    const spentFill = el("div", "fill spent" + tone);
    spentFill.style.width = pct(spent, hard) + "%";
    const reservedFill = el("div", "fill reserved");
    reservedFill.style.left = pct(spent, hard) + "%";
    reservedFill.style.width = Math.min(pct(reserved, hard), 100 - pct(spent, hard)) + "%";
    const marker = el("div", "marker");
    marker.style.left = "calc(" + pct(soft, hard) + "% - 1px)";
    marker.title = "soft cap " + usd(c.soft_cap_usd);
    const bar = el("div", "bar", spentFill, reservedFill, marker);
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", String(hard));
    bar.setAttribute("aria-valuenow", String(spent));
    bar.setAttribute("aria-label", "month-to-date spend against the hard cap");
    const state = c.hard_cap_reached ? "hard cap reached: no cloud calls until next month"
      : c.soft_cap_reached ? "soft cap reached: work with a local handler runs locally"
      : "under the soft cap";
    const nodes = [
      el("div", "big", usd(c.spent_usd), el("span", "muted", " of " + usd(c.hard_cap_usd))),
      bar,
      el("div", "muted", "soft cap " + usd(c.soft_cap_usd) + " · reserved " +
         usd(c.reserved_usd) + " · remaining " + usd(c.remaining_usd) + " · " + state),
      kv([["month", (c.month || "-") + " (" + (c.timezone || "UTC") + ")"],
          ["ledger", (c.store || "-") + (c.healthy === false ? " (unhealthy)" : "")]]),
    ];
    if (c.error) nodes.push(el("p", "error", String(c.error)));
    const byAction = Object.entries(obj(c.by_action));
    if (byAction.length) {
      byAction.sort((a, b) => num(b[1]) - num(a[1]));
      nodes.push(table(["action", "spent"], byAction.map(([a, v]) => [a, usd(v)]), [false, true]));
    }
    put("cost", ...nodes);
  }

  function renderCounts(s) {
    const counts = obj(s.dispatch_counts);
    const actions = Object.keys(counts).sort();
    if (!actions.length) { put("counts", el("p", "muted", "No dispatches yet.")); return; }
    const seen = new Set();
    for (const a of actions) for (const k of Object.keys(obj(counts[a]))) seen.add(k);
    // Successes by source; failures by error code, marked ✗.
    const failures = [...seen].filter((k) => !SOURCES.includes(k)).sort();
    const columns = SOURCES.filter((k) => seen.has(k)).concat(failures);
    const rows = actions.map((a) => {
      const row = obj(counts[a]);
      const cells = columns.map((k) => (row[k] ? String(row[k]) : ""));
      const total = columns.reduce((sum, k) => sum + num(row[k]), 0);
      return [a, ...cells, String(total)];
    });
    const heads = ["action", ...columns.map((k) =>
      (failures.includes(k) ? "✗ " : "") + k.replaceAll("_", " ")), "total"];
    const node = table(heads, rows, [false, ...columns.map(() => true), true]);
    node.querySelectorAll("th").forEach((th, i) => {
      if (!failures.includes(columns[i - 1])) return;
      th.classList.add("bad");
      th.title = "failed: " + columns[i - 1];
    });
    const parts = [node];
    if (failures.length) {
      parts.push(el("p", "note muted", "✗ columns count failures by error code."));
    }
    put("counts", ...parts);
  }

  function renderCircuits(s) {
    const circuits = obj(s.circuits);
    const cloud = circuits.cloud;
    const nodes = [kv([["cloud", cloud ? badge(cloud, stateTone(cloud)) : "not configured"]])];
    const local = Object.entries(obj(circuits.local));
    if (local.length) {
      nodes.push(table(["local action", "state"],
                       local.map(([a, st]) => [a, badge(st, stateTone(st))]), [false, false]));
    } else {
      nodes.push(el("p", "note muted", "Every local handler's circuit is closed."));
    }
    const conn = s.connectivity;
    if (conn && typeof conn === "object") {
      const label = (k) => k.replace(/_s$/, "").replace(/_at$/, "").replaceAll("_", " ");
      nodes.push(kv(Object.entries(conn).map(([k, v]) => [label(k), shown(k, v)])));
    }
    const missing = Object.entries(obj(s.cloud_missing_handlers));
    if (missing.length) {
      nodes.push(el("p", "error", "The cloud has no handler for " +
        missing.map(([a, n]) => a + " (" + plural(num(n), "call") + ")").join(", ") +
        "; they ran here instead. Register them on the cloud instance too."));
    }
    put("circuits", ...nodes);
  }

  function renderOutbox(s) {
    const o = obj(s.outbox);
    const dead = Array.isArray(s.dead_letters) ? s.dead_letters : [];
    const nodes = [kv([
      ["pending", el("span", "big", String(num(o.depth)))],
      ["dead letters", num(o.dead_letters) ? badge(String(o.dead_letters), "bad") : "0"],
      ["oldest pending", o.oldest_pending_at ? when(o.oldest_pending_at) : "-"],
    ])];
    if (dead.length) nodes.push(deadLetters(dead));
    const sync = obj(s.sync);
    if (sync.error) nodes.push(el("p", "error", "last sync: " + sync.error));
    put("outbox", ...nodes);
  }

  // No scroll box: each dead letter is two rows, its id, action, attempts and buttons, then
  // its error across the whole card, wrapped.
  function deadLetters(dead) {
    const head = el("tr", null, el("th", null, "id"), el("th", null, "action"),
                    el("th", "num", "attempts"), el("th", null, ""));
    const rows = dead.flatMap((d) => {
      d = obj(d);
      const id = String(d.id ?? "");
      const retry = el("button", "retry", "retry");
      retry.type = "button";
      retry.title = "send it to the cloud again";
      retry.addEventListener("click", () => outboxAction("retry", id, String(d.action ?? "")));
      const drop = el("button", "drop", "drop");
      drop.type = "button";
      drop.title = "delete it: it will never run";
      drop.addEventListener("click", () => outboxAction("drop", id, String(d.action ?? "")));
      const error = el("td", "err", String(d.error ?? ""));
      error.colSpan = 4;
      return [el("tr", "head", el("td", null, shortId(id)), el("td", null, String(d.action ?? "")),
                 el("td", "num", String(d.attempts ?? "")), el("td", "acts", retry, drop)),
              el("tr", null, error)];
    });
    return el("table", "dead", el("thead", null, head), el("tbody", null, ...rows));
  }

  async function outboxAction(verb, id, action) {
    const question = verb === "retry"
      ? "Retry dead letter " + id + " (" + action + ") now?"
      : "Drop dead letter " + id + " (" + action + ")? It will never run.";
    if (!window.confirm(question)) return;
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    const url = OUTBOX_URL + encodeURIComponent(id) + (verb === "retry" ? "/retry" : "");
    try {
      const response = await fetch(url, { method: verb === "retry" ? "POST" : "DELETE", headers,
                                           cache: "no-store", credentials: "omit" });
      if (response.status === 401) {
        if (token) sessionStorage.removeItem(TOKEN_KEY);
        askForToken("The server wants its LOCAL_API_TOKEN to " + verb + " a dead letter.");
        return;
      }
      if (!response.ok) {
        let detail = "";
        try {
          detail = String(obj(await response.json()).detail || "");
        } catch (err) {
          detail = "";
        }
        banner(verb + " " + id + " failed: HTTP " + response.status +
               (detail ? ": " + detail : ""));
        return;
      }
      banner("");
    } catch (err) {
      banner(verb + " " + id + " failed: " + (err && err.message ? err.message : err));
      return;
    }
    refresh();
  }

  function renderJobs(s) {
    const sched = s.scheduler;
    if (!sched || typeof sched !== "object") {
      put("jobs", el("p", "muted", "The scheduler is not running."));
      return;
    }
    const jobs = Array.isArray(sched.jobs) ? sched.jobs : [];
    const nodes = [];
    if (jobs.length) {
      nodes.push(table(["job", "action", "trigger", "next run", "runs", "last"],
        jobs.map((j) => { j = obj(j); return [
          String(j.id ?? "") + (j.mirrored ? " (mirrored)" : ""), String(j.action ?? ""),
          String(j.trigger ?? ""), when(j.next_run_time), String(num(j.runs)),
          j.last_outcome ? String(j.last_outcome) : "-"]; }),
        [false, false, false, false, true, false]));
    } else {
      nodes.push(el("p", "muted", "No scheduled jobs."));
    }
    const mirror = obj(sched.mirror);
    nodes.push(el("p", "note muted", "time zone " + (sched.timezone || "-") + " · replica lock " +
      (sched.replica_lock || "-") + " · mirrored from the cloud: " +
      (mirror.enabled ? String(num(mirror.count)) : "off")));
    if (mirror.last_error) nodes.push(el("p", "error", "mirror: " + mirror.last_error));
    put("jobs", ...nodes);
  }

  function renderInfra(s) {
    const bus = obj(s.bus), cache = obj(s.cache), routes = obj(s.routes);
    const redis = bus.redis_configured ? (bus.redis_connected ? "connected" : "not connected")
      : "not configured";
    const pairs = [
      ["bus backend", badge(String(bus.backend || "?"), bus.backend === "redis" ? "ok" : "muted")],
      ["redis", redis],
      ["bus backlog", String(num(bus.backlog))],
      ["cache", num(cache.entries) + " entries (ttl " + num(cache.ttl_sec) + " s)"],
      ["route table", num(routes.entries) + " entries from " + (routes.source || "-")],
      ["actions", Array.isArray(s.actions) ? s.actions.length + " registered" : "-"],
    ];
    const nodes = [kv(pairs)];
    if (bus.last_error) nodes.push(el("p", "error", "bus: " + bus.last_error));
    put("infra", ...nodes);
  }

  function render(s) {
    renderHeader(s); renderCost(s); renderCounts(s); renderCircuits(s);
    renderOutbox(s); renderJobs(s); renderInfra(s);
    document.getElementById("main").hidden = false;
  }

  function banner(text) {
    const node = document.getElementById("banner");
    node.textContent = text || "";
    node.hidden = !text;
  }
  function askForToken(message) {
    document.getElementById("main").hidden = true;
    document.getElementById("login").hidden = false;
    const error = document.getElementById("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    document.getElementById("token").focus();
  }
  function schedule() { clearTimeout(timer); timer = setTimeout(refresh, REFRESH_MS); }

  async function refresh() {
    clearTimeout(timer);
    if (busy) return;
    busy = true;
    try { await load(); } finally { busy = false; }
  }

  async function load() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { "Accept": "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    let response, body;
    try {
      response = await fetch(STATUS_URL, { headers, cache: "no-store", credentials: "omit" });
      if (response.status === 401) {
        if (token) sessionStorage.removeItem(TOKEN_KEY);
        banner("");
        askForToken(token ? "That token was refused; enter the server's LOCAL_API_TOKEN." : "");
        return;  // nothing to refresh until a token is given
      }
      if (!response.ok) throw new Error("GET /status answered HTTP " + response.status);
      body = await response.json();
    } catch (err) {
      banner("Cannot read the status: " + (err && err.message ? err.message : err) +
             ". Retrying every " + REFRESH_MS / 1000 + " s.");
      schedule();
      return;
    }
    document.getElementById("login").hidden = true;
    banner("");
    try { render(obj(body)); } catch (err) { banner("Cannot show the status: " + err); }
    schedule();
  }

  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    const token = input.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    input.value = "";
    refresh();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && document.getElementById("login").hidden) refresh();
  });
  window.everreachStatus = { refresh, render };
  refresh();
})();
"""

_BODY = """<header>
<h1>EverReach</h1>
<div id="badges" class="badges"><span class="badge b-muted">loading</span></div>
<div id="updated" class="muted"></div>
</header>
<div id="banner" class="banner" role="alert" hidden></div>
<form id="login" class="card" hidden>
<label for="token">This server needs its <b>LOCAL_API_TOKEN</b> to show its status. The token
stays in this tab only (sessionStorage).</label>
<input id="token" name="token" type="password" autocomplete="current-password"
 placeholder="LOCAL_API_TOKEN" required>
<button type="submit">Show status</button>
<p id="login-error" class="error" hidden></p>
</form>
<main id="main" hidden>
<section class="card"><h2>Spend this month</h2><div id="cost"></div></section>
<section class="card"><h2>Outbox</h2><div id="outbox"></div></section>
<section class="card"><h2>Circuits and connectivity</h2><div id="circuits"></div></section>
<section class="card wide"><h2>Dispatches by source</h2><div id="counts"></div></section>
<section class="card wide span2"><h2>Scheduled jobs</h2><div id="jobs"></div></section>
<section class="card"><h2>Bus, cache and routes</h2><div id="infra"></div></section>
</main>
"""


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@functools.cache
def render_status_page() -> str:
    """Return the status page: one HTML document with its CSS and JavaScript inline."""
    script = _SCRIPT.replace("__REFRESH_MS__", str(REFRESH_S * 1000))
    csp = (
        f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(_STYLE)}; "
        f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    )
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        "<title>EverReach status</title>\n"
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{_BODY}<script>{script}</script>\n"
        "</body>\n</html>\n"
    )
