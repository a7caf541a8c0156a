/* VX11 dashboard graphs: per module requests/s, error %, p50/p99 latency and rate-limit
 * rejections over the last 15 minutes, from GET /vx11/traffic (summed over every gateway
 * process when Redis is configured), redrawn every few seconds with Chart.js (vendored).
 * Also keeps the modules in trouble first: breaker open, then half-open or health down,
 * then error % over 5 in the last minute; then by name.
 * Each card carries its totals as data attributes (data-requests, data-error-percent…), and
 * its bulkhead: calls in flight / the module's max_concurrent cap (this process).
 */
(function () {
  "use strict";

  var root = document.getElementById("vx11-dashboard");
  if (!root || typeof window.Chart === "undefined") return;
  var cardsBox = document.getElementById("vx-cards");
  var url = root.getAttribute("data-traffic-url");
  var REFRESH_MS = 3000;
  var ERROR_HIGH = 5;
  var charts = {}; // module -> {kind: Chart}
  var latest = {};
  var COLOURS = { rps: "#2b6cb0", errors: "#b3261e", p50: "#1b7f3b", p99: "#a86400", limited: "#6b46c1" };

  function label(epoch) {
    return new Date(epoch * 1000).toISOString().substring(11, 16);
  }

  // A point shows only where it has no neighbour to draw a line to (one busy 10 s bucket).
  function isolated(ctx) {
    var data = ctx.dataset.data, i = ctx.dataIndex;
    var none = function (v) { return v === null || v === undefined; };
    return !none(data[i]) && none(data[i - 1]) && none(data[i + 1]) ? 2.5 : 0;
  }

  function dataset(name, data, colour) {
    return { label: name, data: data, borderColor: colour, backgroundColor: colour + "33", borderWidth: 1.5,
             pointRadius: isolated, tension: 0.2, fill: name !== "p99", spanGaps: true };
  }

  function makeChart(canvas, sets, unit) {
    return new window.Chart(canvas, {
      type: "line",
      data: { labels: [], datasets: sets },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        plugins: { legend: { display: sets.length > 1, labels: { boxWidth: 8, font: { size: 9 } } },
                   title: { display: true, text: unit, font: { size: 10 }, padding: 2 } },
        scales: { x: { ticks: { maxTicksLimit: 4, font: { size: 9 }, maxRotation: 0 } },
                  y: { beginAtZero: true, ticks: { maxTicksLimit: 4, font: { size: 9 } } } }
      }
    });
  }

  function chartsFor(card, module) {
    if (charts[module] && charts[module].card === card) return charts[module];
    var box = card.querySelector(".vx-graphs");
    if (!box) return null;
    function canvas(kind) { return box.querySelector('canvas[data-chart="' + kind + '"]'); }
    charts[module] = {
      card: card,
      rps: makeChart(canvas("rps"), [dataset("requests/s", [], COLOURS.rps)], "requests/s"),
      errors: makeChart(canvas("errors"), [dataset("error %", [], COLOURS.errors)], "error % (5xx)"),
      latency: makeChart(canvas("latency"), [dataset("p50", [], COLOURS.p50), dataset("p99", [], COLOURS.p99)], "latency ms"),
      limited: makeChart(canvas("limited"), [dataset("rejections", [], COLOURS.limited)], "rate-limited (429)")
    };
    return charts[module];
  }

  function recentErrorPercent(series) {
    var req = 0, err = 0, n = series.requests.length;
    for (var i = Math.max(0, n - 6); i < n; i++) {
      req += series.requests[i];
      if (series.error_percent[i] !== null) err += series.error_percent[i] * series.requests[i] / 100;
    }
    return req ? 100 * err / req : 0;
  }

  function rank(card) {
    var breaker = card.getAttribute("data-breaker");
    var health = card.getAttribute("data-health");
    if (breaker === "open") return 4;
    if (breaker === "half_open" || health === "down") return 3;
    if (health === "degraded") return 2;
    if (card.getAttribute("data-trouble") === "errors") return 2;
    return 0;
  }

  function sortCards() {
    var cards = Array.prototype.slice.call(cardsBox.querySelectorAll(".vx-card"));
    var sorted = cards.slice().sort(function (a, b) {
      var d = rank(b) - rank(a);
      if (d) return d;
      var x = a.getAttribute("data-module"), y = b.getAttribute("data-module");
      return x < y ? -1 : x > y ? 1 : 0;
    });
    for (var i = 0; i < sorted.length; i++) {
      if (sorted[i] !== cards[i]) {
        sorted.forEach(function (card) { cardsBox.appendChild(card); });
        break;
      }
    }
    root.setAttribute("data-order", sorted.map(function (c) { return c.getAttribute("data-module"); }).join(","));
  }

  function fmt(value, digits, suffix) {
    return value === null || value === undefined ? "—" : value.toFixed(digits) + suffix;
  }

  // Calls in flight / the module's own cap (this process), as dashboard.py renders it.
  function bulkheadText(b) {
    if (!b) return "no cap of its own";
    return b.inflight + " / " + b.max_concurrent + (b.queued ? " · " + b.queued + " queued" : "");
  }

  function render(body) {
    latest = body.modules || {};
    var labels = (body.times || []).map(label);
    var cards = cardsBox.querySelectorAll(".vx-card");
    for (var i = 0; i < cards.length; i++) {
      var card = cards[i];
      var module = card.getAttribute("data-module");
      var series = latest[module];
      var set = chartsFor(card, module);
      if (!set) continue;
      var empty = labels.map(function () { return 0; });
      var s = series || { requests_per_second: empty, error_percent: empty, p50_ms: empty, p99_ms: empty,
                          rate_limited: empty, requests: empty, totals: { requests: 0, rate_limited: 0 } };
      [["rps", [s.requests_per_second]], ["errors", [s.error_percent]], ["latency", [s.p50_ms, s.p99_ms]],
       ["limited", [s.rate_limited]]].forEach(function (pair) {
        var chart = set[pair[0]];
        chart.data.labels = labels;
        pair[1].forEach(function (data, k) { chart.data.datasets[k].data = data; });
        chart.update("none");
      });
      var t = s.totals;
      card.setAttribute("data-requests", String(t.requests || 0));
      card.setAttribute("data-rate-limited", String(t.rate_limited || 0));
      card.setAttribute("data-error-percent", t.error_percent === null || t.error_percent === undefined ? "" : String(t.error_percent));
      card.setAttribute("data-trouble", series && recentErrorPercent(series) >= ERROR_HIGH ? "errors" : "");
      var summary = card.querySelector('[data-field="traffic"]');
      if (summary) {
        summary.textContent = (t.requests || 0) + " requests · errors " + fmt(t.error_percent, 1, " %") +
          " · p50 " + fmt(t.p50_ms, 1, " ms") + " · p99 " + fmt(t.p99_ms, 1, " ms") + " · 429s " + (t.rate_limited || 0);
      }
    }
    var heads = body.bulkheads || {};
    for (var j = 0; j < cards.length; j++) {
      var cell = cards[j].querySelector('[data-field="bulkhead"]');
      if (cell) cell.textContent = bulkheadText(heads[cards[j].getAttribute("data-module")]);
    }
    root.setAttribute("data-traffic-at", String(Date.now()));
    root.setAttribute("data-traffic-shared", body.shared ? "yes" : "no");
    sortCards();
  }

  function refresh() {
    fetch(url + "?minutes=15", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) { if (!response.ok) throw new Error("HTTP " + response.status); return response.json(); })
      .then(render)
      .catch(function () { root.setAttribute("data-traffic-error", "yes"); })
      .then(function () { setTimeout(refresh, REFRESH_MS); });
  }

  root.addEventListener("vx11:changed", sortCards);
  refresh();
})();
