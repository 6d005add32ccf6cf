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
      ...spendForecast(c.forecast),
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
    const waiting = Array.isArray(s.waiting) ? s.waiting : [];
    if (waiting.length) nodes.push(waitingItems(waiting));
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
      const action = String(d.action ?? "");
      const retry = outboxButton("retry", "retry", "send it to the cloud again", id, action);
      const drop = outboxButton("drop", "drop", "delete it: it will never run", id, action);
      const error = el("td", "err", String(d.error ?? ""));
      error.colSpan = 4;
      return [el("tr", "head", el("td", null, shortId(id)), el("td", null, String(d.action ?? "")),
                 el("td", "num", String(d.attempts ?? "")), el("td", "acts", retry, drop)),
              el("tr", null, error)];
    });
    return el("table", "dead", el("thead", null, head), el("tbody", null, ...rows));
  }

  // Items kept until their time (over a rate limit, or scheduled): each can be cancelled.
  function waitingItems(waiting) {
    const head = el("tr", null, el("th", null, "waiting"), el("th", null, "action"),
                    el("th", null, "sent at"), el("th", null, ""));
    const rows = waiting.map((w) => {
      w = obj(w);
      const id = String(w.id ?? "");
      const cancel = outboxButton("cancel", "drop", "cancel it before its time: it will never run",
                                  id, String(w.action ?? ""));
      return el("tr", null, el("td", null, shortId(id)), el("td", null, String(w.action ?? "")),
                el("td", null, w.not_before ? when(w.not_before) : "-"), el("td", "acts", cancel));
    });
    return el("table", "waiting", el("thead", null, head), el("tbody", null, ...rows));
  }

  function outboxButton(verb, cls, title, id, action) {
    const button = el("button", cls, verb);
    button.type = "button";
    button.title = title;
    button.addEventListener("click", () => outboxAction(verb, id, action));
    return button;
  }

  async function outboxAction(verb, id, action) {
    const question = verb === "retry"
      ? "Retry dead letter " + id + " (" + action + ") now?"
      : verb === "cancel"
        ? "Cancel " + id + " (" + action + ") before its time? It will never run."
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
        askForToken("The server wants its LOCAL_API_TOKEN to " + verb + " an outbox item.");
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

  // Pacing: each limit's use of its window, the next free slot and the work waiting for it.
  function renderRateLimits(s) {
    const pacing = obj(s.rate_limits);
    const limits = Array.isArray(pacing.limits) ? pacing.limits : [];
    if (!limits.length) {
      put("rate-limits", el("p", "muted", "No rate limits (" + (pacing.file || "no file") + ")."));
      return;
    }
    const rows = limits.map((l) => { l = obj(l); return [
      String(l.key ?? ""),
      l.available === false ? badge("store down", "bad")
        : num(l.used) + " / " + num(l.max),
      duration(num(l.per_sec)),
      l.next_free_at ? when(l.next_free_at) : "now",
      num(l.deferred) ? badge(String(num(l.deferred)), "warn") : "0",
      duration(num(l.backlog_s))]; });
    put("rate-limits",
      table(["limit", "used / max", "window", "next free", "deferred", "backlog"], rows,
            [false, true, true, false, true, true]),
      el("p", "note muted", "store " + (pacing.store || "-")));
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

  // -- alerts: where they go, then the last events as a timeline, newest first ---------------
  const ALERT_EVENTS = 20;
  const ALERT_TONES = { cloud_online: "ok", soft_cap_reached: "warn", rate_limit_backlog: "warn" };
  const DELIVERY_TONES = { sent: "ok", recorded: "muted", pending: "info", suppressed: "warn",
                           failed: "bad" };
  function renderAlerts(s) {
    const a = s.alerts;
    if (!a || typeof a !== "object") {
      put("alerts", el("p", "muted", "This server does not report alerts."));
      return;
    }
    const sinks = Array.isArray(a.sinks) ? a.sinks.map(String) : [];
    const nodes = [el("p", "note muted", sinks.length ? "sent to the " + sinks.join(" and ")
      : "No ALERT_WEBHOOK_URL or ALERT_ACTION is set: events are only recorded here.")];
    const events = Array.isArray(a.events) ? a.events.slice(0, ALERT_EVENTS) : [];
    if (events.length) nodes.push(el("ol", "timeline", ...events.map(alertItem)));
    else nodes.push(el("p", "muted", "No alerts yet."));
    const failures = Array.isArray(a.failures) ? a.failures : [];
    if (failures.length) {
      const f = obj(failures[0]);
      nodes.push(el("p", "error", failures.length + (failures.length === 1 ? " delivery" :
        " deliveries") + " failed; the last: " + String(f.event ?? "?") + " to the " +
        String(f.sink ?? "?") + ": " + String(f.error ?? "")));
    }
    put("alerts", ...nodes);
  }
  function alertItem(e) {
    e = obj(e);
    const event = String(e.event ?? "?");
    const tone = ALERT_TONES[event] || "bad";
    const delivery = String(e.status ?? "?");
    const head = el("div", "t-head", badge(event.replaceAll("_", " "), tone), when(e.at),
                    e.subject ? shortId(e.subject) : null,
                    badge(delivery, DELIVERY_TONES[delivery] || "muted"));
    return el("li", "t-" + tone, head, el("div", "t-detail", String(e.detail ?? "")));
  }

  function render(s) {
    renderHeader(s); renderCost(s); renderCounts(s); renderCircuits(s);
    renderOutbox(s); renderRateLimits(s); renderJobs(s); renderInfra(s);
    renderAlerts(s);
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
