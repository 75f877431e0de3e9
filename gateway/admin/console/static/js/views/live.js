// A tenant's live view: headline numbers and one chart per series, from the shared stats poll.
// Spend in the budget period comes from the usage endpoint (billing data) every few polls, and moves
// with the stats' spend counter in between.

import { api, path } from "../api.js";
import { lineChart, PALETTE } from "../charts.js";
import { h } from "../dom.js";
import * as fmt from "../format.js";
import * as poller from "../poller.js";
import { REASONS, replicaKey, tenantPoint } from "../rates.js";

const USAGE_EVERY_MS = 10000;
const REASON_LABELS = {
  rpm: "rpm",
  tpm: "tpm",
  concurrency: "concurrency",
  inflight_tokens: "in-flight tokens",
  budget: "budget",
  queue_full: "queue full",
  queue_timeout: "queue timeout",
};
const PERIOD_WORDS = { day: "today", week: "this week", month: "this month" };

/** Start of the budget period containing `now` (UTC), as gateway/admission/limits/_period.py computes it. */
export function periodStart(period, now = new Date()) {
  const day = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
  if (period === "day") return day;
  if (period === "week") {
    const weekday = (day.getUTCDay() + 6) % 7; // Monday = 0 (ISO weeks)
    return new Date(day.getTime() - weekday * 86400000);
  }
  return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), 1));
}

function tile(id, label) {
  const value = h("p", { class: "tile-value", "data-tile": id, "data-value": "" }, fmt.NONE);
  const sub = h("p", { class: "tile-sub" });
  return { el: h("div", { class: "tile", role: "group", "aria-label": label }, h("p", { class: "tile-label" }, label), value, sub), value, sub };
}

function set(t, text, numeric, sub = "") {
  t.value.textContent = text;
  t.value.dataset.value = numeric === null || numeric === undefined ? "" : String(numeric);
  t.sub.textContent = sub;
}

function spendOf(snapshot, id) {
  const t = snapshot.tenants.find((x) => x.id === id);
  return t ? Object.values(t.spend).reduce((a, b) => a + b, 0) : 0;
}

export function liveView(host, tenant) {
  const tiles = {
    requests: tile("requests", "Requests"),
    tokens: tile("tokens", "Tokens"),
    share: tile("share", "Share of capacity"),
    wait: tile("wait", "Queue wait p50 / p99"),
    limited: tile("limited", "Refused (429)"),
    cache: tile("cache", "Cache hit ratio"),
    load: tile("load", "In flight / queued"),
    spend: tile("spend", "Spend this period"),
  };
  // The browser colours the meter: green below 80% of the budget, amber to 95%, red beyond.
  const meter = h("meter", { min: "0", max: "1", low: "0.8", high: "0.95", optimum: "0", value: "0", class: "budget-meter", "aria-label": "Budget used" });
  tiles.spend.el.append(meter);

  const charts = {
    requests: lineChart({
      id: "requests",
      title: "Requests per second",
      series: [
        { label: "Served", color: PALETTE[0] },
        { label: "429", color: PALETTE[1] },
        { label: "Errors", color: PALETTE[4] },
      ],
      format: (v) => fmt.num(v),
    }),
    tokens: lineChart({
      id: "tokens",
      title: "Tokens per second",
      series: [
        { label: "Prompt", color: PALETTE[0] },
        { label: "Completion", color: PALETTE[2] },
        { label: "Cached", color: PALETTE[3], dash: [5, 4] },
      ],
      format: (v) => fmt.num(v),
    }),
    share: lineChart({
      id: "share",
      title: "Share of capacity",
      description: "Served prompt + 2 × completion tokens, against weight ÷ active tenants' weights.",
      series: [
        { label: "Served", color: PALETTE[0] },
        { label: "Entitled", color: PALETTE[8], dash: [6, 4] },
      ],
      format: (v) => fmt.pct(v),
      ceiling: 1,
    }),
    wait: lineChart({
      id: "wait",
      title: "Queue wait",
      series: [
        { label: "p50", color: PALETTE[0] },
        { label: "p99", color: PALETTE[1] },
      ],
      format: (v) => fmt.ms(v),
      floor: 0.01,
    }),
    limited: lineChart({
      id: "limited",
      title: "429s per second by reason",
      series: REASONS.map((r, i) => ({ label: REASON_LABELS[r], color: PALETTE[i] })),
      format: (v) => fmt.num(v),
      quiet: "No 429s in this window.",
    }),
    spend: lineChart({
      id: "spend",
      title: tenant.budget ? `Spend ${PERIOD_WORDS[tenant.budget.period]} against the budget` : "Spend this month",
      series: tenant.budget
        ? [
            { label: "Spent", color: PALETTE[0] },
            { label: "Budget", color: PALETTE[4], dash: [6, 4] },
          ]
        : [{ label: "Spent", color: PALETTE[0] }],
      format: (v) => fmt.money(v),
      floor: tenant.budget ? tenant.budget.amount : 0.01,
    }),
    cache: lineChart({
      id: "cache",
      title: "Prefix-cache hit ratio",
      description: "Cached prompt tokens ÷ prompt tokens, as the backends report them.",
      series: [{ label: "Hit ratio", color: PALETTE[5] }],
      format: (v) => fmt.pct(v),
      ceiling: 1,
    }),
  };

  const waiting = h("p", { class: "notice", role: "status" }, "Collecting data: the first rates appear after two polls (a few seconds).");
  host.replaceChildren(
    waiting,
    h("section", { "aria-label": "Now", class: "tiles" }, Object.values(tiles).map((t) => t.el)),
    h("section", { "aria-label": "Charts", class: "charts" }, Object.values(charts).map((c) => c.el)),
  );

  // Spend in the current budget period: the usage report (billing data) plus the stats' spend since.
  const period = tenant.budget ? tenant.budget.period : "month";
  let usage = null; // {spend, currency, snapshot}
  let lastUsageAt = 0;
  let fetching = false;
  async function fetchUsage(snapshot) {
    if (fetching) return;
    fetching = true;
    try {
      const report = await api("GET", path.usage(tenant.id, periodStart(period).toISOString()));
      const currencies = Object.keys(report.spend);
      usage = {
        spend: Object.values(report.spend).reduce((a, b) => a + b, 0),
        currency: currencies[0] || "USD",
        snapshot,
      };
      lastUsageAt = Date.now();
    } catch {
      // The next poll tries again; the tile keeps its last value.
    } finally {
      fetching = false;
    }
  }

  function render({ history, intervals, latest }) {
    if (!latest) return;
    if (Date.now() - lastUsageAt > USAGE_EVERY_MS) fetchUsage(latest);
    const xs = history.map((s) => s.time);
    const points = intervals.map((iv) => tenantPoint(iv, tenant.id));
    const col = (fn) => points.map((p) => (p ? fn(p) : null));
    charts.requests.update(xs, [col((p) => p.ok), col((p) => p.limited), col((p) => p.errors)]);
    charts.tokens.update(xs, [col((p) => p.prompt), col((p) => p.completion), col((p) => p.cached)]);
    charts.share.update(xs, [col((p) => p.share), col((p) => (p.active ? p.entitled : null))]);
    charts.wait.update(xs, [col((p) => p.waitP50), col((p) => p.waitP99)]);
    charts.limited.update(xs, REASONS.map((r) => col((p) => p.rejections[r])));
    charts.cache.update(xs, [col((p) => p.cacheHit)]);

    let spent = null;
    if (usage) {
      const base = spendOf(usage.snapshot, tenant.id);
      const key = replicaKey(usage.snapshot);
      const spendSeries = history.map((s) => (replicaKey(s) === key ? Math.max(0, usage.spend + spendOf(s, tenant.id) - base) : null));
      const cols = [spendSeries];
      if (tenant.budget) cols.push(history.map(() => tenant.budget.amount));
      charts.spend.update(xs, cols);
      spent = spendSeries[spendSeries.length - 1];
    }

    const p = points[points.length - 1];
    waiting.hidden = points.some(Boolean);
    set(tiles.requests, p ? fmt.rate(p.requests) : fmt.NONE, p && p.requests, p ? `${fmt.rate(p.ok)} served` : "");
    set(tiles.tokens, p ? fmt.rate(p.tokens) : fmt.NONE, p && p.tokens, p ? `${fmt.num(p.prompt)} prompt · ${fmt.num(p.completion)} completion` : "");
    set(
      tiles.share,
      p && p.share !== null ? fmt.pct(p.share) : fmt.NONE,
      p && p.share,
      p && p.active ? `entitled to ${fmt.pct(p.entitled)} (weight ${fmt.num(tenant.weight, 2)})` : "idle",
    );
    set(tiles.wait, p && p.waitP50 !== null ? `${fmt.ms(p.waitP50)} / ${fmt.ms(p.waitP99)}` : fmt.NONE, p && p.waitP99, p && p.waitP50 === null ? "nothing queued" : "");
    const reasons = p ? REASONS.filter((r) => p.rejections[r] > 0).map((r) => REASON_LABELS[r]) : [];
    set(tiles.limited, p ? fmt.rate(p.limited) : fmt.NONE, p && p.limited, reasons.length ? reasons.join(", ") : "none");
    set(tiles.cache, p && p.cacheHit !== null ? fmt.pct(p.cacheHit) : fmt.NONE, p && p.cacheHit, "of prompt tokens");
    const now = latest.tenants.find((x) => x.id === tenant.id);
    set(tiles.load, now ? `${now.inflight} / ${now.queued}` : fmt.NONE, now && now.inflight + now.queued, "requests now");
    const currency = usage ? usage.currency : "USD";
    if (tenant.budget) {
      const used = spent !== null && tenant.budget.amount > 0 ? spent / tenant.budget.amount : null;
      set(tiles.spend, fmt.money(spent, currency), spent, `of ${fmt.money(tenant.budget.amount, currency)} (${fmt.pct(used, 1)})`);
      meter.hidden = false;
      meter.value = Math.min(1, used || 0);
      meter.setAttribute("aria-valuetext", `${fmt.pct(used, 1)} of the budget used`);
    } else {
      set(tiles.spend, fmt.money(spent, currency), spent, "no budget");
      meter.hidden = true;
    }
  }

  const unsubscribe = poller.subscribe(render);
  return () => {
    unsubscribe();
    for (const c of Object.values(charts)) c.destroy();
  };
}
