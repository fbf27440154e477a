// touchstream operations console. No external assets: charts are inline SVG.
//
// URL: /ops?token=<ops token> (the gateway then sets a session cookie and this page
// takes the token out of the address bar), or /ops with basic auth. It reads
//   /ops/api/events  (Server-Sent Events: "state" snapshots, "alert" as each fires)
// with the browser's EventSource, which reconnects by itself; each reconnect starts
// with a fresh "state". Customer ids arrive already masked (…1234).
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_ALERTS = 50;
  const store = window.sessionStorage;

  // --- auth: keep a token from the URL for this tab, out of the address bar ------------
  function tokenFromUrl() {
    const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
    const query = new URLSearchParams(location.search);
    return hash.get("token") || query.get("token");
  }
  let token = tokenFromUrl();
  if (token) {
    store.setItem("touchstream.ops.token", token);
    history.replaceState(null, "", location.pathname);
  } else {
    token = store.getItem("touchstream.ops.token");
  }
  function api(path) {
    return token ? path + "?" + new URLSearchParams({ token: token }) : path;
  }

  // --- small helpers -------------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function svgRoot(w, h) {
    return svgEl("svg", { viewBox: "0 0 " + w + " " + h, role: "img" });
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmtTime(ms) { return new Date(ms).toLocaleTimeString(); }
  function fmtMs(ms) { return ms >= 1000 ? (ms / 1000).toFixed(ms >= 10000 ? 0 : 1) + " s" : ms + " ms"; }
  function ticksFor(max) { return max < 4 ? max : (max % 5 === 0 ? 5 : 4); }
  const DURATIONS = new Set(["window", "visit_gap", "dwell", "mean_dwell", "within"]);
  function fmtDuration(ms) {
    for (const [unit, n] of [["d", 86400000], ["h", 3600000], ["m", 60000], ["s", 1000]]) {
      if (ms >= n * (unit === "d" ? 2 : 1) && ms % n === 0) return ms / n + unit;
    }
    return ms + "ms";
  }
  function shortMs(ms) { return ms >= 1000 ? ms / 1000 + "s" : String(ms); }
  function pct(x) { return (100 * x).toFixed(x < 0.1 && x > 0 ? 1 : 0) + "%"; }
  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function setStatus(state, text) { $("status").dataset.state = state; $("status").textContent = text; }

  let ruleColors = {};
  function colorOf(rule) {
    if (!(rule in ruleColors)) ruleColors[rule] = Object.keys(ruleColors).length % 8;
    return "c" + ruleColors[rule];
  }

  // --- charts --------------------------------------------------------------------------
  function yAxis(svg, x0, y0, x1, h, max, ticks) {
    for (let i = 0; i <= ticks; i++) {
      const y = y0 + h - (h * i) / ticks;
      svg.appendChild(svgEl("line", { x1: x0, x2: x1, y1: y, y2: y, class: i ? "grid" : "axis" }));
      svg.appendChild(svgEl("text", { x: x0 - 4, y: y + 3, "text-anchor": "end" },
        Math.round((max * i) / ticks)));
    }
  }

  function pushesChart(ppm) {
    const box = $("pushes-chart");
    clear(box);
    const minutes = ppm.minutes || [];
    const rules = ppm.rules || {};
    const names = Object.keys(rules);
    const W = 720, H = 190, L = 34, T = 8, B = 22, R = 6;
    const w = W - L - R, h = H - T - B;
    const totals = minutes.map((_, i) => names.reduce((s, r) => s + rules[r][i], 0));
    const max = niceMax(Math.max(1, ...totals));
    const svg = svgRoot(W, H);
    yAxis(svg, L, T, W - R, h, max, ticksFor(max));
    const bw = w / Math.max(1, minutes.length);
    minutes.forEach((m, i) => {
      let y = T + h;
      for (const r of names) {
        const n = rules[r][i];
        if (!n) continue;
        const bh = (h * n) / max;
        y -= bh;
        const rect = svgEl("rect", { x: L + i * bw + 1, y: y, width: Math.max(1, bw - 2),
          height: bh, class: "bar " + colorOf(r) });
        rect.appendChild(svgEl("title", {}, r + " " + fmtTime(m) + ": " + n));
        svg.appendChild(rect);
      }
      if (i % 5 === 4 || i === minutes.length - 1) {
        svg.appendChild(svgEl("text", { x: L + i * bw + bw / 2, y: H - 6, "text-anchor": "middle" },
          new Date(m).toTimeString().slice(0, 5)));
      }
    });
    box.appendChild(svg);
    const legend = $("pushes-legend");
    clear(legend);
    if (!names.length) legend.appendChild(el("span", "none", "No pushes in the last 30 minutes."));
    for (const r of names) {
      const item = el("span", "item");
      item.appendChild(el("span", "swatch " + colorOf(r)));
      item.appendChild(document.createTextNode(r + " " + rules[r].reduce((a, b) => a + b, 0)));
      legend.appendChild(item);
    }
  }

  function latencyChart(lat) {
    const box = $("latency-chart");
    clear(box);
    const counts = lat.counts || [];
    const bounds = lat.bounds_ms || [];
    const W = 420, H = 190, L = 34, T = 8, B = 34, R = 30;
    const w = W - L - R, h = H - T - B;
    const max = niceMax(Math.max(1, ...counts));
    const svg = svgRoot(W, H);
    yAxis(svg, L, T, W - R, h, max, ticksFor(max));
    const bw = w / Math.max(1, counts.length);
    const total = counts.reduce((a, b) => a + b, 0);
    let acc = 0;
    const pts = [];
    counts.forEach((n, i) => {
      const bh = (h * n) / max;
      const rect = svgEl("rect", { x: L + i * bw + 1, y: T + h - bh, width: Math.max(1, bw - 2),
        height: bh, class: "bar lat" });
      const label = i < bounds.length ? "≤ " + fmtMs(bounds[i]) : "> " + fmtMs(bounds[bounds.length - 1]);
      rect.appendChild(svgEl("title", {}, label + ": " + n));
      svg.appendChild(rect);
      svg.appendChild(svgEl("text", { x: L + i * bw + bw / 2, y: T + h + 12, "text-anchor": "middle" },
        i < bounds.length ? shortMs(bounds[i]) : ">"));
      acc += n;
      if (total) pts.push((L + (i + 1) * bw) + "," + (T + h - (h * acc) / total));
    });
    if (pts.length) {
      svg.appendChild(svgEl("polyline", { points: (L + "," + (T + h)) + " " + pts.join(" "), class: "cdf" }));
      svg.appendChild(svgEl("text", { x: W - R + 3, y: T + 4 }, "100%"));
      svg.appendChild(svgEl("text", { x: W - R + 3, y: T + h / 2 + 3 }, "50%"));
    }
    svg.appendChild(svgEl("text", { x: L, y: H - 4 }, "upper bound (ms, s) · bars: pushes · line: cumulative share"));
    box.appendChild(svg);
    $("latency-summary").textContent = lat.count
      ? lat.count + " pushes · p50 " + fmtMs(lat.p50) + " · p90 " + fmtMs(lat.p90) +
        " · p99 " + fmtMs(lat.p99) + " · max " + fmtMs(lat.max)
      : "No pushes in the window yet.";
  }

  function groupChart(boxId, groups) {
    const box = $(boxId);
    clear(box);
    const names = Object.keys(groups || {}).sort();
    if (!names.length) { box.appendChild(el("p", "none", "Nothing yet.")); return; }
    const W = 460, row = 26, L = 100, R = 100, T = 4;
    const H = T + names.length * row + 16;
    const max = niceMax(Math.max(1, ...names.map((n) => Math.max(groups[n].tries || 0, groups[n].orders || 0))));
    const svg = svgRoot(W, H);
    const w = W - L - R;
    names.forEach((n, i) => {
      const g = groups[n];
      const y = T + i * row;
      svg.appendChild(svgEl("text", { x: L - 6, y: y + 15, "text-anchor": "end", class: "label-strong" }, n));
      const tw = (w * (g.tries || 0)) / max, ow = (w * (g.orders || 0)) / max;
      const t = svgEl("rect", { x: L, y: y + 3, width: Math.max(0, tw), height: 9, class: "bar tries" });
      t.appendChild(svgEl("title", {}, "tries " + (g.tries || 0)));
      const o = svgEl("rect", { x: L, y: y + 13, width: Math.max(0, ow), height: 9, class: "bar orders" });
      o.appendChild(svgEl("title", {}, "orders " + (g.orders || 0)));
      svg.append(t, o);
      svg.appendChild(svgEl("text", { x: L + Math.max(tw, ow) + 4, y: y + 16 },
        (g.tries || 0) + " / " + (g.orders || 0)));
      const conv = g.pushes ? pct(g.conversion_rate || 0) + " of " + g.pushes : "–";
      svg.appendChild(svgEl("text", { x: W - 2, y: y + 16, "text-anchor": "end" }, conv));
    });
    svg.appendChild(svgEl("text", { x: L, y: H - 3 }, "light: tries · green: orders · right: pushes converted"));
    box.appendChild(svg);
  }

  function deadChart(stats) {
    const box = $("dead-chart");
    clear(box);
    const dl = (stats && stats.dead_letters) || {};
    const names = Object.keys(dl).sort((a, b) => dl[b] - dl[a]);
    $("dead-total").textContent = stats ? "(" + (stats.dead_letters_total || 0) + ")" : "";
    if (!names.length) { box.appendChild(el("p", "none", "None.")); return; }
    const W = 420, row = 20, L = 110, R = 40;
    const svg = svgRoot(W, names.length * row + 4);
    const max = niceMax(Math.max(...names.map((n) => dl[n])));
    names.forEach((n, i) => {
      const y = i * row + 2;
      const bw = ((W - L - R) * dl[n]) / max;
      svg.appendChild(svgEl("text", { x: L - 6, y: y + 13, "text-anchor": "end" }, n));
      svg.appendChild(svgEl("rect", { x: L, y: y + 3, width: Math.max(1, bw), height: 13, class: "bar dead" }));
      svg.appendChild(svgEl("text", { x: L + bw + 4, y: y + 13 }, dl[n]));
    });
    box.appendChild(svg);
  }

  function totals(stats, state) {
    const dl = $("totals");
    clear(dl);
    if (!stats) { dl.appendChild(el("dd", "none", "No stats yet (is the engine running with --redis?).")); return; }
    const ev = stats.events || {};
    const rules = stats.rules || {};
    const sum = (f) => Object.values(rules).reduce((a, r) => a + (r[f] || 0), 0);
    const rows = [
      ["events", Object.keys(ev).sort().map((k) => k + " " + ev[k]).join(" · ") || "0"],
      ["pushes", sum("pushes")],
      ["conversions", sum("conversions")],
      ["alerts", Object.entries(stats.alerts || {}).map(([k, v]) => k.replace("touchstream.", "") + " " + v).join(" · ") || "0"],
      ["dead letters", stats.dead_letters_total || 0],
      ["stats written", state.stats_at_ms ? fmtTime(state.stats_at_ms) : "–"],
    ];
    for (const [k, v] of rows) dl.append(el("dt", null, k), el("dd", null, v));
  }

  function ruleTable(rulesDoc, stats) {
    const tbody = $("rules").tBodies[0];
    clear(tbody);
    if (!rulesDoc) {
      $("ruleset").textContent = "rule set: unknown";
      $("rules-meta").textContent = "The engine has not published its rules (ops:rules) yet.";
      return;
    }
    const rs = rulesDoc.rules || [];
    $("ruleset").textContent = "rule set v" + rulesDoc.version + " · " + rs.length + " rules";
    const g = rulesDoc.guards || {};
    $("rules-meta").title = String(rulesDoc.source);
    $("rules-meta").textContent = "version " + rulesDoc.version + " from " +
      String(rulesDoc.source).split("/").pop() +
      ", loaded " + (rulesDoc.loaded_at ? new Date(rulesDoc.loaded_at).toLocaleString() : "?") +
      " · guards: at most " + g.max_pushes_per_customer + " pushes per customer per " +
      Math.round((g.cap_window_s || 0) / 3600) + " h" + (g.respect_opt_out ? ", opt-out respected" : "");
    const rstats = (stats && stats.rules) || {};
    for (const r of rs) {
      const tr = document.createElement("tr");
      const id = el("td");
      id.appendChild(el("span", "swatch " + colorOf(r.id)));
      id.appendChild(document.createTextNode(r.id + " v" + r.version));
      const trig = el("td", null, (r.trigger && r.trigger.kind) || "?");
      const params = Object.entries(r.trigger || {}).filter(([k]) => k !== "kind")
        .filter(([, v]) => !(Array.isArray(v) && !v.length) && v !== null)
        .map(([k, v]) => k + "=" + (Array.isArray(v) ? v.join(",")
          : DURATIONS.has(k) && typeof v === "number" ? fmtDuration(v) : v)).join(" ");
      if (params) { trig.appendChild(document.createElement("br")); trig.appendChild(el("span", "params", params)); }
      const acts = [];
      if (r.push) acts.push("push " + (r.push.module || "‹module›") + "/" + r.push.kind);
      if (r.alert) acts.push("alert " + r.alert);
      const s = rstats[r.id] || {};
      const blocked = Object.entries(s.blocked || {}).map(([k, v]) => k + " " + v).join(", ");
      tr.append(id, trig, el("td", null, acts.join(" + ")), el("td", null, r.once_per),
        el("td", "num", s.pushes || 0), el("td", null, blocked || "–"),
        el("td", "num", s.alerts || 0), el("td", "num", s.pushes ? pct(s.conversion_rate || 0) : "–"));
      tbody.appendChild(tr);
    }
  }

  // --- alerts --------------------------------------------------------------------------
  function chip(parent, label, value) {
    parent.appendChild(el("span", null, label + " " + value));
  }

  function alertItem(a, fresh) {
    const d = a.data || {};
    const step = a.type === "touchstream.dwell.step";
    const li = el("li", "alert " + (step ? "type-step" : "type-customer") + (fresh ? " new" : ""));
    li.dataset.id = a.id;
    const head = el("div", "head");
    head.append(el("span", "type", a.type), el("time", null, a.time ? new Date(a.time).toLocaleTimeString() : ""));
    li.appendChild(head);
    const ev = el("div", "evidence");
    if (step) {
      li.appendChild(el("p", "what", d.module + "/" + d.step + ": " + d.n + " customers stalled"));
      chip(ev, "n", d.n);
      chip(ev, "mean", d.mean_s + " s");
      chip(ev, "p90", d.p90_s + " s");
      chip(ev, "threshold", d.threshold_mean_s + " s");
      if (d.share_subscribed !== undefined) chip(ev, "subscribed", pct(d.share_subscribed));
      li.appendChild(ev);
      if (Array.isArray(d.samples) && d.samples.length) {
        const t = el("table", "samples");
        const hr = document.createElement("tr");
        hr.append(el("th", null, "customer"), el("th", null, "dwell"), el("th", null, "subscribed"));
        t.appendChild(hr);
        for (const s of d.samples) {
          if (!s || typeof s !== "object") continue;
          const tr = document.createElement("tr");
          tr.append(el("td", null, s.customer_id), el("td", null, s.dwell_s + " s"),
            el("td", null, s.subscribed ? "yes" : "no"));
          t.appendChild(tr);
        }
        li.appendChild(t);
      }
    } else if (a.type === "touchstream.dwell.customer") {
      li.appendChild(el("p", "what", d.customer_id + " stuck on " + d.module + "/" + d.step +
        " for " + d.dwell_s + " s" + (d.terminal_id ? " at " + d.terminal_id : "")));
      chip(ev, "threshold", d.threshold_s + " s");
      if (d.hall_id) chip(ev, "hall", d.hall_id);
      chip(ev, "subscribed", d.subscribed ? "yes" : "no");
      chip(ev, "rule", d.rule_id + " v" + d.rule_version);
      li.appendChild(ev);
    } else {
      li.appendChild(el("p", "what", a.subject || ""));
      for (const [k, v] of Object.entries(d)) if (v === null || typeof v !== "object") chip(ev, k, v);
      li.appendChild(ev);
    }
    return li;
  }

  const seen = new Set();
  function setAlerts(list) {
    const ol = $("alerts");
    clear(ol);
    seen.clear();
    for (const a of list) { seen.add(a.id); ol.appendChild(alertItem(a, false)); }
    alertsChanged();
  }
  function addAlert(a) {
    if (seen.has(a.id)) return;
    seen.add(a.id);
    const ol = $("alerts");
    ol.insertBefore(alertItem(a, true), ol.firstChild);
    while (ol.children.length > MAX_ALERTS) ol.lastElementChild.remove();
    alertsChanged();
  }
  function alertsChanged() {
    const n = $("alerts").children.length;
    $("alerts-empty").hidden = n > 0;
    $("alerts-count").textContent = n ? "(" + n + " latest)" : "";
  }

  // --- state ---------------------------------------------------------------------------
  function render(state) {
    if (state.rules && Array.isArray(state.rules.rules)) state.rules.rules.forEach((r) => colorOf(r.id));
    const stats = state.stats;
    pushesChart(state.pushes_per_minute || {});
    latencyChart(state.latency || {});
    groupChart("halls-chart", stats && stats.halls);
    groupChart("modules-chart", stats && stats.modules);
    deadChart(stats);
    totals(stats, state);
    ruleTable(state.rules, stats);
    $("asof").textContent = "updated " + fmtTime(state.now_ms || Date.now());
    if (Array.isArray(state.alerts)) setAlerts(state.alerts);
  }

  let source = null;
  let backoff = 1000;
  function connect() {
    source = new EventSource(api("/ops/api/events"));
    source.onopen = function () { backoff = 1000; setStatus("live", "live"); };
    source.addEventListener("state", function (ev) {
      try { render(JSON.parse(ev.data)); } catch (err) { console.warn("touchstream ops: bad state", err); }
    });
    source.addEventListener("alert", function (ev) {
      try { addAlert(JSON.parse(ev.data)); } catch (err) { console.warn("touchstream ops: bad alert", err); }
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        setStatus("retrying", "disconnected, retrying…");
        const wait = backoff;
        backoff = Math.min(backoff * 2, 60000);
        setTimeout(connect, wait);
      } else {
        setStatus("retrying", "reconnecting…");
      }
    };
  }
  connect();
})();
