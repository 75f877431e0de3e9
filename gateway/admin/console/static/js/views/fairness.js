// Fairness: every active tenant's served share of the capacity against its entitlement, on one chart,
// and the same numbers in a table. The chart is rebuilt when the set of tenants drawn changes.

import { lineChart, PALETTE } from "../charts.js";
import { h } from "../dom.js";
import * as fmt from "../format.js";
import * as poller from "../poller.js";
import { contenders, jain, tenantPoint } from "../rates.js";

const MAX_TENANTS = 9; // one colour each; the table lists the rest

export function fairnessView(main) {
  const chartHost = h("div", { class: "fairness-chart" });
  const index = h("p", { class: "tile-value", "data-tile": "jain", "data-value": "" }, fmt.NONE);
  const indexSub = h("p", { class: "tile-sub" });
  const backlogged = h("p", { class: "tile-value", "data-tile": "backlogged", "data-value": "" }, fmt.NONE);
  const total = h("p", { class: "tile-value", "data-tile": "served", "data-value": "" }, fmt.NONE);
  const body = h("tbody", {});
  const scope = h("p", { class: "hint scope", hidden: true });
  main.replaceChildren(
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        {},
        h("h1", { tabindex: "-1" }, "Fairness"),
        h("p", { class: "lede" }, "Each active tenant's share of the service it was given (prompt + 2 × completion tokens, the fair queue's measure) against its entitlement: its weight over the weights of the tenants active at the time."),
        scope,
      ),
    ),
    h(
      "section",
      { class: "tiles", "aria-label": "Now" },
      h("div", { class: "tile", role: "group", "aria-label": "Jain's index" }, h("p", { class: "tile-label" }, "Jain's index, served ÷ entitled"), index, indexSub),
      h("div", { class: "tile", role: "group", "aria-label": "Backlogged tenants" }, h("p", { class: "tile-label" }, "Backlogged tenants"), backlogged, h("p", { class: "tile-sub" }, "with requests queued now")),
      h("div", { class: "tile", role: "group", "aria-label": "Service" }, h("p", { class: "tile-label" }, "Service given"), total, h("p", { class: "tile-sub" }, "weighted tokens per second")),
    ),
    chartHost,
    h(
      "div",
      { class: "card table-card" },
      h(
        "div",
        { class: "table-scroll" },
        h(
          "table",
          { class: "table", "aria-label": "Share against entitlement by tenant" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Tenant"),
              h("th", { scope: "col", class: "num" }, "Weight"),
              h("th", { scope: "col", class: "num optional" }, "Priority"),
              h("th", { scope: "col", class: "num" }, "Entitled"),
              h("th", { scope: "col", class: "num" }, "Served"),
              h("th", { scope: "col", class: "num optional" }, "Served ÷ entitled"),
              h("th", { scope: "col", class: "num optional" }, "Queued"),
              h("th", { scope: "col", class: "num" }, "Requests/s"),
            ),
          ),
          body,
        ),
      ),
    ),
    h("p", { class: "hint" }, "A tenant below its entitlement with nothing queued simply asked for less: the queue gives unused capacity to the others. Priority bands come before weights: a higher band is served first."),
  );

  let chart = null;
  let drawn = "";

  function render({ history, intervals, latest }) {
    // With several processes publishing their figures, a share is of the service all of them gave.
    const n = latest ? latest.replicas.length : 1;
    scope.hidden = n < 2;
    scope.textContent = `Across all ${n} gateway processes (replicas and their workers): each tenant's service is summed over them, so its share is of what they all served together.`;
    const active = new Map();
    for (const iv of intervals) {
      if (!iv) continue;
      for (const [id, d] of iv.tenants) if (d.active) active.set(id, d.weight);
    }
    const ids = [...active.keys()].sort((a, b) => active.get(b) - active.get(a) || a.localeCompare(b)).slice(0, MAX_TENANTS);
    const shape = ids.join(" ");
    if (shape !== drawn || chart === null) {
      if (chart) chart.destroy();
      drawn = shape;
      chart = ids.length
        ? lineChart({
            id: "fairness",
            title: "Served share against entitlement",
            description: "Solid: served share. Dashed: entitlement. Same colour, same tenant.",
            series: ids.flatMap((id, i) => [
              { label: `${id} served`, color: PALETTE[i % PALETTE.length] },
              { label: `${id} entitled`, color: PALETTE[i % PALETTE.length], dash: [6, 4] },
            ]),
            format: (v) => fmt.pct(v),
            ceiling: 1,
            height: 260,
          })
        : null;
      chartHost.replaceChildren(chart ? chart.el : h("p", { class: "notice" }, "No tenant has been active in the last five minutes."));
    }
    const xs = history.map((s) => s.time);
    if (chart) {
      chart.update(
        xs,
        ids.flatMap((id) => {
          const pts = intervals.map((iv) => tenantPoint(iv, id));
          return [pts.map((p) => (p && p.active ? p.share : null)), pts.map((p) => (p && p.active ? p.entitled : null))];
        }),
      );
    }

    const iv = intervals[intervals.length - 1];
    // The index only means something while tenants compete: with nothing queued every tenant got all
    // it asked for, and a share below the weight is a tenant asking for less, not unfairness.
    const competing = contenders(iv);
    const j = jain(iv);
    if (!iv) {
      index.textContent = fmt.NONE;
      index.dataset.state = "";
      indexSub.textContent = "";
    } else if (j === null) {
      index.textContent = "No contention";
      index.dataset.state = "uncontended";
      indexSub.textContent =
        competing.length === 1 ? `only ${competing[0]} had requests queued` : "no tenant had requests queued";
    } else {
      index.textContent = j.toFixed(2);
      index.dataset.state = "contended";
      indexSub.textContent = `${competing.length} tenants queued · 1.00 is exactly by weight`;
    }
    index.dataset.value = j === null ? "" : String(j);
    const rows = iv ? [...iv.tenants.entries()].filter(([, d]) => d.active) : [];
    const queued = rows.filter(([, d]) => d.queued > 0).length;
    backlogged.textContent = iv ? String(queued) : fmt.NONE;
    backlogged.dataset.value = iv ? String(queued) : "";
    total.textContent = iv ? fmt.rate(iv.served / iv.dt) : fmt.NONE;
    total.dataset.value = iv ? String(iv.served / iv.dt) : "";
    rows.sort(([a, x], [b, y]) => y.weight - x.weight || a.localeCompare(b));
    body.replaceChildren(
      ...(rows.length
        ? rows.map(([id, d]) => {
            const p = tenantPoint(iv, id);
            const ratio = d.entitled > 0 && d.share !== null ? d.share / d.entitled : null;
            return h(
              "tr",
              { "data-tenant": id },
              h("th", { scope: "row" }, h("a", { href: `#/tenants/${encodeURIComponent(id)}` }, id)),
              h("td", { class: "num" }, fmt.num(d.weight, 2)),
              h("td", { class: "num optional" }, String(d.priority)),
              h("td", { class: "num" }, fmt.pct(d.entitled)),
              h("td", { class: "num", "data-share": d.share === null ? "" : String(d.share) }, fmt.pct(d.share)),
              h("td", { class: "num optional" }, ratio === null ? fmt.NONE : ratio.toFixed(2)),
              h("td", { class: "num optional" }, String(d.queued)),
              h("td", { class: "num" }, fmt.rate(p.requests)),
            );
          })
        : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No traffic in the last few seconds."))]),
    );
  }

  const unsubscribe = poller.subscribe(render);
  return () => {
    unsubscribe();
    if (chart) chart.destroy();
  };
}
