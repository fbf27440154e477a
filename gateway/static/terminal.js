// touchstream reference terminal client. Copy freely.
//
// URL: /terminal/<terminal id>#token=<token>  (the fragment never reaches a server or a
// log; ?token= works too). The token is kept in localStorage so a reload keeps working.
// It subscribes with the browser's own EventSource to
//   /v1/terminals/<id>/pushes?token=...
// Each event has the stream entry id, so EventSource's automatic reconnect sends
// Last-Event-ID and gets exactly what it missed. When EventSource gives up (the gateway
// answered 401/403/503, or the page was reloaded) it is re-created with ?since=<last id>
// after a backoff. The page shows only what a push carries (module, kind, text, content);
// it never shows the customer.
"use strict";

(function () {
  const RESUME_MAX_MS = 10 * 60 * 1000; // after a reload, replay at most 10 minutes back
  const MAX_CARDS = 12;
  const TITLES = {
    help: "Need a hand with this step?",
    setup_guide: "Set it up first",
    offer: "Try this",
    content: "Picked for you",
    trial_ending: "Your free trial ends soon",
  };

  const parts = location.pathname.split("/");
  const terminalId = decodeURIComponent(parts[parts.length - 1] || "");
  const store = window.localStorage;
  const tokenKey = "touchstream.token." + terminalId;
  const lastKey = "touchstream.last." + terminalId;

  function tokenFromUrl() {
    const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
    const query = new URLSearchParams(location.search);
    return hash.get("token") || query.get("token");
  }

  let token = tokenFromUrl();
  if (token) {
    store.setItem(tokenKey, token);
    history.replaceState(null, "", location.pathname); // keep it out of the address bar
  } else {
    token = store.getItem(tokenKey);
  }

  const statusEl = document.getElementById("status");
  const listEl = document.getElementById("pushes");
  const emptyEl = document.getElementById("empty");
  document.getElementById("terminal").textContent = "Terminal " + terminalId;

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
  }

  function pretty(name) {
    return String(name || "").replace(/_/g, " ");
  }

  function formatValue(key, value) {
    if (Array.isArray(value)) return value.map(String).join(", ");
    if (typeof value === "number" && /(_ts|_end|_at)$/.test(key) && value > 1e11) {
      return new Date(value).toLocaleString();
    }
    if (value !== null && typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function render(push) {
    const content = push.content || {};
    const kind = String(content.kind || "push");
    const li = document.createElement("li");
    li.className = "push kind-" + kind.replace(/[^a-z0-9_-]/gi, "");

    const module = document.createElement("div");
    module.className = "module";
    module.textContent = pretty(content.module);
    li.appendChild(module);

    const title = document.createElement("h2");
    title.textContent = Object.prototype.hasOwnProperty.call(TITLES, kind)
      ? TITLES[kind] : pretty(kind);
    li.appendChild(title);

    if (content.text) {
      const text = document.createElement("p");
      text.className = "text";
      text.textContent = String(content.text);
      li.appendChild(text);
    }

    const extra = Object.keys(content).filter((k) => !["kind", "module", "text"].includes(k));
    if (extra.length) {
      const dl = document.createElement("dl");
      for (const k of extra) {
        const dt = document.createElement("dt");
        dt.textContent = pretty(k);
        const dd = document.createElement("dd");
        dd.textContent = formatValue(k, content[k]);
        dl.append(dt, dd);
      }
      li.appendChild(dl);
    }

    const when = document.createElement("time");
    when.textContent = new Date().toLocaleTimeString();
    li.appendChild(when);

    emptyEl.hidden = true;
    listEl.prepend(li);
    while (listEl.children.length > MAX_CARDS) listEl.lastElementChild.remove();
  }

  function resumeFrom() {
    const last = store.getItem(lastKey);
    if (!last) return null;
    const ms = Number(last.split("-")[0]);
    return Date.now() - ms <= RESUME_MAX_MS ? last : null;
  }

  let source = null;
  let backoff = 1000;

  function connect() {
    if (!token) {
      setStatus("stopped", "no token: open /terminal/" + terminalId + "#token=…");
      return;
    }
    const params = new URLSearchParams({ token: token });
    const since = resumeFrom();
    if (since) params.set("since", since);
    const url = "/v1/terminals/" + encodeURIComponent(terminalId) + "/pushes?" + params;
    source = new EventSource(url);
    source.onopen = function () {
      backoff = 1000;
      setStatus("live", "live");
    };
    source.addEventListener("push", function (ev) {
      if (ev.lastEventId) store.setItem(lastKey, ev.lastEventId);
      try {
        render(JSON.parse(ev.data));
      } catch (err) {
        console.warn("touchstream: unreadable push", err);
      }
    });
    source.addEventListener("bye", function (ev) {
      let reason = "";
      try { reason = JSON.parse(ev.data).reason; } catch (err) { /* ignore */ }
      if (reason === "token_expired") {
        source.close();
        setStatus("stopped", "token expired: ask for a new one");
      }
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        // the gateway refused (401/403/503) or the stream ended for good: retry later
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
