/* VX11 live dashboard: keeps the module cards current from /ws/events.
 *
 * - On every (re)connection the server sends a "snapshot" first; the cards are
 *   redrawn from it, so nothing missed while disconnected stays wrong.
 * - Reconnects with exponential backoff (0.5 s doubling, capped at 10 s, jittered)
 *   and shows the connection state in text, not only colour.
 * - Each card lists the module's targets (up / down / ejected until …, weight, in
 *   flight), kept current from "target.health" and "target.ejected" events.
 * - Buttons call the management API with the session and the CSRF token.
 * Vanilla JS, no build step.
 */
(function () {
  "use strict";

  var root = document.getElementById("vx11-dashboard");
  if (!root) return;

  var BACKOFF_START_MS = 500;
  var BACKOFF_CAP_MS = 10000;
  var BREAKER_TONES = { closed: "ok", half_open: "warn", open: "bad" };
  var HEALTH_TONES = { up: "ok", degraded: "warn", down: "bad", unknown: "idle" };
  var ACTION_TEXT = {
    reset: { ask: "Reset the circuit breaker of %s? It closes and its failure count starts over.", done: "Breaker reset." },
    force_open: { ask: "Force the circuit breaker of %s open? Every call to it is refused until you reset it or force it closed.", done: "Breaker forced open." },
    force_closed: { ask: "Force the circuit breaker of %s closed? Calls go through even while it fails.", done: "Breaker forced closed." },
    probe: { ask: "Probe the health of %s now?", done: "Probe finished." }
  };

  var connection = document.getElementById("vx-connection");
  var connectionText = connection.querySelector(".vx-connection-text");
  var cardsBox = document.getElementById("vx-cards");
  var template = document.getElementById("vx-card-template");
  var globalFeedback = document.getElementById("vx-global-feedback");

  // Each module's targets as last told (snapshot, target.health, target.ejected).
  var targetsByModule = {};

  var socket = null;
  var attempt = 0;
  var retryTimer = null;
  var countdownTimer = null;
  var stopped = false;

  // ------------------------------------------------------------------ helpers

  function setConnection(state, text) {
    connection.setAttribute("data-state", state);
    connectionText.textContent = text;
    root.setAttribute("data-connection", state);
  }

  function field(card, name) {
    return card.querySelector('[data-field="' + name + '"]');
  }

  function clock(epoch) {
    if (epoch === null || epoch === undefined) return "never";
    return new Date(epoch * 1000).toISOString().substring(11, 19) + " UTC";
  }

  function entries(count) {
    count = count || 0;
    return count + (count === 1 ? " entry" : " entries");
  }

  function feedback(el, text, tone) {
    el.textContent = text;
    el.setAttribute("data-tone", tone || "");
  }

  function cardFor(module, create) {
    var cards = cardsBox.querySelectorAll(".vx-card");
    for (var i = 0; i < cards.length; i++) {
      if (cards[i].getAttribute("data-module") === module) return cards[i];
    }
    if (!create || !template) return null;
    var card = template.content.firstElementChild.cloneNode(true);
    card.setAttribute("data-module", module);
    card.setAttribute("aria-labelledby", "vx-title-" + module);
    var title = card.querySelector("h2");
    title.id = "vx-title-" + module;
    title.textContent = module;
    var placeholder = cardsBox.querySelector(":scope > p");
    if (placeholder) placeholder.remove();
    cardsBox.appendChild(card);
    return card;
  }

  function flash(card) {
    card.classList.remove("vx-flash");
    void card.offsetWidth; // restart the animation
    card.classList.add("vx-flash");
  }

  // ------------------------------------------------------------------ rendering

  function applyBreaker(module, breaker) {
    var card = cardFor(module, true);
    if (!card || !breaker) return;
    var state = breaker.state || "unknown";
    var label = state.replace("_", "-");
    if (breaker.forced) label += " (forced " + breaker.forced + ")";
    card.setAttribute("data-breaker", state);
    var badge = field(card, "breaker");
    badge.textContent = label;
    badge.setAttribute("data-tone", BREAKER_TONES[state] || "idle");
    if (breaker.failure_count !== undefined) field(card, "failures").textContent = String(breaker.failure_count);
  }

  function applyHealth(module, health) {
    var card = cardFor(module, true);
    if (!card || !health) return;
    if (health.url !== undefined) field(card, "url").textContent = health.url;
    if (health.enabled !== undefined) field(card, "disabled").hidden = !!health.enabled;
    var status = health.status || (health.up === true ? "up" : health.up === false ? "down" : "unknown");
    card.setAttribute("data-health", status);
    var badge = field(card, "health");
    badge.textContent = status;
    badge.setAttribute("data-tone", HEALTH_TONES[status] || "idle");
    if ("latency_ms" in health) {
      field(card, "latency").textContent = health.latency_ms === null ? "—" : Math.round(health.latency_ms) + " ms";
    }
    if ("last_check" in health) field(card, "last-check").textContent = clock(health.last_check);
    if ("last_error" in health) field(card, "error").textContent = health.last_error || "";
  }

  // ------------------------------------------------------------------ targets (SPEC §18)

  function targetState(t, now) {
    // The same rules as gateway/console/dashboard.py::target_state.
    if (t.enabled === false) return ["disabled", "idle"];
    if (t.ejected_until && t.ejected_until > now) return ["ejected until " + clock(t.ejected_until), "warn"];
    var status = (t.health && t.health.status) || "unknown";
    if (t.down || status === "down") return ["down", "bad"];
    return [status, HEALTH_TONES[status] || "idle"];
  }

  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text;
    row.appendChild(td);
    return td;
  }

  function renderTargets(module) {
    var card = cardFor(module, false);
    var targets = targetsByModule[module];
    if (!card || !targets) return;
    var table = field(card, "targets");
    var body = table.querySelector("tbody");
    body.textContent = "";
    var now = Date.now() / 1000;
    targets.forEach(function (t) {
      var row = document.createElement("tr");
      var state = targetState(t, now);
      row.setAttribute("data-target", t.key);
      row.setAttribute("data-state", state[0]);
      var code = document.createElement("code");
      code.textContent = t.key;
      code.title = t.url || "";
      cell(row, "").appendChild(code);
      cell(row, String(t.weight === undefined ? "" : t.weight));
      var badge = document.createElement("span");
      badge.className = "vx-badge";
      badge.setAttribute("data-tone", state[1]);
      badge.textContent = state[0];
      cell(row, "").appendChild(badge);
      cell(row, String(t.in_flight || 0));
      body.appendChild(row);
    });
    table.hidden = targets.length === 0;
  }

  function findTarget(module, key) {
    var targets = targetsByModule[module] || [];
    for (var i = 0; i < targets.length; i++) if (targets[i].key === key) return targets[i];
    return null;
  }

  function applyTargetHealth(message) {
    var t = findTarget(message.module, message.target);
    if (!t) return;
    t.health = { status: message.status, latency_ms: message.latency_ms, last_check: message.last_check,
                 consecutive_failures: message.consecutive_failures, last_error: message.last_error };
    t.down = message.status === "down";
    renderTargets(message.module);
  }

  function applyTargetEjected(message) {
    var t = findTarget(message.module, message.target);
    if (!t) return;
    t.ejected_until = message.ejected ? message.until : null;
    if (message.count !== undefined) t.ejections = message.count;
    renderTargets(message.module);
    var card = cardFor(message.module, false);
    if (card && message.ejected) flash(card);
  }

  // An ejection's end is also shown when its time passes (the event may come a bit later).
  setInterval(function () {
    var now = Date.now() / 1000;
    Object.keys(targetsByModule).forEach(function (module) {
      var due = targetsByModule[module].some(function (t) { return t.ejected_until && t.ejected_until <= now; });
      if (due) {
        targetsByModule[module].forEach(function (t) { if (t.ejected_until && t.ejected_until <= now) t.ejected_until = null; });
        renderTargets(module);
      }
    });
  }, 1000);

  function applySnapshot(message) {
    var modules = message.modules || {};
    var breakers = message.breakers || {};
    var names = Object.keys(modules);
    var cards = cardsBox.querySelectorAll(".vx-card");
    for (var i = 0; i < cards.length; i++) {
      if (!(cards[i].getAttribute("data-module") in modules)) cards[i].remove();
    }
    targetsByModule = {};
    names.sort().forEach(function (name) {
      applyHealth(name, modules[name]);
      applyBreaker(name, breakers[name]);
      targetsByModule[name] = modules[name].targets || [];
      renderTargets(name);
    });
    root.setAttribute("data-synced-at", String(message.time || ""));
    root.dispatchEvent(new Event("vx11:changed")); // traffic.js sorts the cards by trouble
  }

  function handle(message) {
    switch (message.type) {
      case "snapshot":
        attempt = 0;
        applySnapshot(message);
        setConnection("live", "Live: updates appear as they happen");
        break;
      case "breaker.transition": {
        var breaker = message.breaker || { state: message.to };
        applyBreaker(message.module, breaker);
        var card = cardFor(message.module, false);
        if (card) flash(card);
        root.dispatchEvent(new Event("vx11:changed"));
        break;
      }
      case "module.health":
        applyHealth(message.module, message);
        if ((targetsByModule[message.module] || []).length === 1) {
          // A module of one target: its module.health is that target's (no target.health).
          applyTargetHealth(Object.assign({}, message, { target: targetsByModule[message.module][0].key }));
        }
        root.dispatchEvent(new Event("vx11:changed"));
        break;
      case "target.health":
        applyTargetHealth(message);
        break;
      case "target.ejected":
        applyTargetEjected(message);
        break;
      case "route.changed":
        feedback(globalFeedback, "Route “" + message.intent + "” " + (message.action || "changed") + " at " + clock(message.time) + ".", "ok");
        break;
      case "cache.cleared":
        feedback(globalFeedback, "Cache cleared: " + entries(message.keys_deleted) + " removed at " + clock(message.time) + ".", "ok");
        break;
      default:
        break; // events this page does not show
    }
  }

  // ------------------------------------------------------------------ connection

  function scheduleReconnect() {
    var delay = Math.min(BACKOFF_CAP_MS, BACKOFF_START_MS * Math.pow(2, attempt));
    delay = Math.round(delay * (0.75 + Math.random() * 0.25));
    attempt += 1;
    var due = Date.now() + delay;
    function tick() {
      var left = Math.max(0, Math.ceil((due - Date.now()) / 1000));
      setConnection("reconnecting", "Disconnected: reconnecting in " + left + " s (attempt " + attempt + ")");
    }
    tick();
    clearInterval(countdownTimer);
    countdownTimer = setInterval(tick, 1000);
    clearTimeout(retryTimer);
    retryTimer = setTimeout(function () {
      clearInterval(countdownTimer);
      connect();
    }, delay);
  }

  function connect() {
    if (stopped) return;
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    setConnection("connecting", attempt ? "Reconnecting… (attempt " + attempt + ")" : "Connecting to the live stream…");
    try {
      socket = new WebSocket(scheme + window.location.host + root.getAttribute("data-ws-path"));
    } catch (err) {
      scheduleReconnect();
      return;
    }
    socket.onmessage = function (ev) {
      var message;
      try { message = JSON.parse(ev.data); } catch (err) { return; }
      handle(message);
    };
    socket.onclose = function (ev) {
      socket = null;
      if (ev.code === 4401 || ev.code === 4403) {
        stopped = true;
        setConnection("refused", ev.code === 4401
          ? "Not connected: your session has ended. Log in again and reload this page."
          : "Not connected: this account may not watch the live stream.");
        return;
      }
      scheduleReconnect();
    };
  }

  function resync() {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "snapshot" }));
  }

  // ------------------------------------------------------------------ actions

  function csrfToken() {
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (match) return decodeURIComponent(match[1]);
    var input = root.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(), "Accept": "application/json" },
      body: body === undefined ? "{}" : JSON.stringify(body)
    }).then(function (response) {
      return response.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (err) { data = null; }
        if (!response.ok) {
          var reason = data && (data.detail || data.title) ? (data.detail || data.title) : "HTTP " + response.status;
          throw new Error(reason);
        }
        return data || {};
      });
    });
  }

  function runAction(button, module, action) {
    var card = cardFor(module, false);
    var out = field(card, "feedback");
    var text = ACTION_TEXT[action];
    if (!window.confirm(text.ask.replace("%s", module))) {
      feedback(out, "Cancelled.", "");
      return;
    }
    var request = action === "probe"
      ? post(root.getAttribute("data-probe-url").replace("__module__", encodeURIComponent(module)))
      : post(root.getAttribute("data-breaker-url") + encodeURIComponent(module), { action: action });
    button.disabled = true;
    feedback(out, "Working…", "");
    request.then(function (data) {
      var detail = "";
      if (action === "probe") {
        applyHealth(module, data);
        detail = " Health: " + (data.status || "unknown") + ".";
      } else {
        var breaker = data.breaker ? Object.assign({ forced: data.forced }, data.breaker) : data;
        if (breaker && breaker.state) {
          applyBreaker(module, breaker);
          detail = " State: " + breaker.state.replace("_", "-") + ".";
        }
      }
      feedback(out, text.done + detail, "ok");
      resync();
    }).catch(function (err) {
      feedback(out, "Failed: " + err.message, "bad");
    }).then(function () {
      button.disabled = false;
    });
  }

  cardsBox.addEventListener("click", function (ev) {
    var button = ev.target.closest("button[data-action]");
    if (!button) return;
    var card = button.closest(".vx-card");
    runAction(button, card.getAttribute("data-module"), button.getAttribute("data-action"));
  });

  document.getElementById("vx-clear-cache").addEventListener("click", function (ev) {
    var button = ev.currentTarget;
    if (!window.confirm("Clear the response cache? Cached health answers are fetched again.")) {
      feedback(globalFeedback, "Cancelled.", "");
      return;
    }
    button.disabled = true;
    feedback(globalFeedback, "Clearing…", "");
    post(root.getAttribute("data-clear-cache-url")).then(function (data) {
      feedback(globalFeedback, "Cache cleared: " + entries(data.keys_deleted) + " removed.", "ok");
    }).catch(function (err) {
      feedback(globalFeedback, "Failed to clear the cache: " + err.message, "bad");
    }).then(function () {
      button.disabled = false;
    });
  });

  connect();
})();
