// Backends: each pool's engines as the fair queue sees them (each endpoint's limit against the permits
// held there) and as they see themselves (running, waiting, KV cache), with what each served. One card
// per pool, rebuilt when the set of pools or endpoints changes, its rows redrawn on every poll.

import { lineChart, PALETTE } from "../charts.js";
import { h } from "../dom.js";
import * as fmt from "../format.js";
import * as poller from "../poller.js";
import { latestEndpointRates, poolSeries, QUEUEING_S, queueing } from "../pools.js";

function count(value) {
  return value === null || value === undefined ? fmt.NONE : String(value);
}

function data(value) {
  return value === null || value === undefined ? "" : String(value);
}

function poolCard(backend) {
  const summary = h("p", { class: "pool-summary" });
  const warning = h("p", { class: "warning pool-warning", hidden: true });
  const body = h("tbody", {});
  const chart = lineChart({
    id: `pool-${backend.name}`,
    title: "Permits against the limit",
    description: "Requests at the pool's engines and how many the gateway allows them; requests waiting inside the engines should stay near 0.",
    series: [
      { label: "Permits", color: PALETTE[0] },
      { label: "Limit", color: PALETTE[8], dash: [6, 4] },
      { label: "Waiting in engines", color: PALETTE[4] },
    ],
    format: (v) => fmt.num(v),
    height: 150,
  });
  const el = h(
    "section",
    { class: "pool", "data-backend": backend.name, "aria-label": `Backend ${backend.name}` },
    h("h2", { class: "section-title pool-title" }, backend.name),
    summary,
    warning,
    h(
      "div",
      { class: "card table-card" },
      h(
        "div",
        { class: "table-scroll" },
        h(
          "table",
          { class: "table", "aria-label": `Engines of ${backend.name}` },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Endpoint"),
              h("th", { scope: "col", class: "num" }, "Permits / limit"),
              h("th", { scope: "col", class: "num optional" }, "Running"),
              h("th", { scope: "col", class: "num" }, "Waiting in engine"),
              h("th", { scope: "col", class: "num optional" }, "Wait in engine"),
              h("th", { scope: "col", class: "num optional" }, "KV cache"),
              h("th", { scope: "col", class: "num" }, "Requests/s"),
              h("th", { scope: "col", class: "num optional" }, "Prefix-cache hits"),
            ),
          ),
          body,
        ),
      ),
    ),
    h("div", { class: "charts pool-charts" }, chart.el),
  );
  return { el, summary, warning, body, chart };
}

function endpointRow(backend, e, rates, waitingLong) {
  const rate = rates.get(`${backend.name} ${e.id}`);
  const used = e.limit > 0 && e.permits !== null ? Math.min(1, e.permits / e.limit) : 0;
  // A bar, not a gauge with good and bad zones: under load every permit is in use by design (the limit
  // binds, and the queue is in the gateway). The numbers beside it carry the value.
  const bar = h("progress", { max: "1", value: String(used), class: "permits-bar", "aria-hidden": "true" });
  return h(
    "tr",
    {
      "data-endpoint": e.id,
      "data-limit": data(e.limit),
      "data-permits": data(e.permits),
      "data-running": data(e.running),
      "data-waiting": data(e.waiting),
      "data-state": waitingLong ? "queueing" : "",
      class: waitingLong ? "row-warning" : null,
    },
    h("th", { scope: "row", class: "mono" }, e.id),
    h("td", { class: "num" }, `${count(e.permits)} / ${count(e.limit)}`, bar),
    h("td", { class: "num optional" }, count(e.running)),
    h(
      "td",
      { class: "num" },
      count(e.waiting),
      waitingLong ? h("span", { class: "badge" }, "queue in the engine") : null,
    ),
    h("td", { class: "num optional", "data-engine-wait": data(e.queue_wait_s) }, e.queue_wait_s == null ? fmt.NONE : fmt.ms(e.queue_wait_s)),
    h("td", { class: "num optional" }, fmt.pct(e.kv_cache_usage)),
    h("td", { class: "num", "data-rate": rate ? String(rate.requests) : "" }, rate ? fmt.rate(rate.requests) : fmt.NONE),
    h("td", { class: "num optional", "data-hit": rate && rate.cacheHit !== null ? String(rate.cacheHit) : "" }, rate ? fmt.pct(rate.cacheHit) : fmt.NONE),
  );
}

export function backendsView(main) {
  const scope = h("p", { class: "hint scope", hidden: true });
  const host = h("div", {}, h("p", { class: "notice" }, "Waiting for the first figures…"));
  main.replaceChildren(
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        {},
        h("h1", { tabindex: "-1" }, "Backends"),
        h(
          "p",
          { class: "lede" },
          "Each pool's engines: how many requests the gateway lets through to each (its limit, set from the engine's own load) against how many it has there, and what the engine itself reports. Requests waiting inside an engine are served first come first served, whatever the tenants' weights: the queue belongs in the gateway, where it is fair.",
        ),
        scope,
      ),
    ),
    host,
  );

  let cards = new Map();
  let drawn = null;

  function render({ history, latest }) {
    if (!latest) return;
    const n = latest.replicas.length;
    scope.hidden = n < 2;
    scope.textContent = `Across all ${n} gateway processes (replicas and their workers): each engine's limit, permits and load are counted once, its requests summed.`;
    // Endpoints without a limit have left their pool; their counters stay in the answer.
    const backends = (latest.backends || []).map((b) => ({ ...b, endpoints: b.endpoints.filter((e) => e.limit !== null) }));
    const shape = backends.map((b) => `${b.name}:${b.endpoints.map((e) => e.id).join(",")}`).join(" ");
    if (shape !== drawn) {
      for (const card of cards.values()) card.chart.destroy();
      cards = new Map(backends.map((b) => [b.name, poolCard(b)]));
      drawn = shape;
      host.replaceChildren(
        ...(cards.size ? [...cards.values()].map((c) => c.el) : [h("p", { class: "notice" }, "No backend is configured.")]),
      );
    }
    const rates = latestEndpointRates(history);
    const xs = history.map((s) => s.time);
    for (const backend of backends) {
      const card = cards.get(backend.name);
      const waitingLong = new Set(backend.endpoints.filter((e) => queueing(history, backend.name, e.id)).map((e) => e.id));
      const permits = backend.endpoints.reduce((x, e) => x + (e.permits || 0), 0);
      const endpoints = backend.endpoints.length;
      card.summary.textContent = `${endpoints} endpoint${endpoints === 1 ? "" : "s"} · ${permits} of ${count(backend.limit)} permits held · ${count(backend.waiting_tenants)} tenant${backend.waiting_tenants === 1 ? "" : "s"} waiting in its fair queue`;
      card.body.replaceChildren(...backend.endpoints.map((e) => endpointRow(backend, e, rates, waitingLong.has(e.id))));
      const warning = waitingLong.size
        ? `Requests keep waiting inside ${[...waitingLong].join(", ")} (more than one on average over the last ${QUEUEING_S} s), where the engine serves them first come first served, whatever the tenants' weights. The capacity control keeps each engine's limit at what it runs, so either it cannot read the engine's load (check that the gateway reaches the engine's /metrics and that the backend's capacity_mode is auto), or other clients send the engine requests without going through the gateway.`
        : "";
      if (card.warning.textContent !== warning) card.warning.textContent = warning;
      card.warning.hidden = !warning;
      const series = poolSeries(history, backend.name);
      card.chart.update(xs, [series.permits, series.limit, series.waiting]);
    }
  }

  const unsubscribe = poller.subscribe(render);
  return () => {
    unsubscribe();
    for (const card of cards.values()) card.chart.destroy();
  };
}
