// The console's arithmetic on /admin/stats snapshots (gateway/admin/console/static/js/rates.js), under Node's
// test runner: rates, entitlement, quantiles, Jain's index, and counter resets.

import assert from "node:assert/strict";
import { test } from "node:test";

import { contenders, interval, intervals, jain, quantile, tenantPoint } from "../../gateway/admin/console/static/js/rates.js";

const BOUNDS = [0.01, 0.1, 1];
const close = (actual, expected) => assert.ok(Math.abs(actual - expected) < 1e-12, `${actual} != ${expected}`);

function tenant(id, fields = {}) {
  return {
    id,
    weight: 1,
    priority: 0,
    requests: {},
    tokens: {},
    rejections: {},
    spend: {},
    queue_wait: { count: 0, sum: 0, buckets: [0, 0, 0] },
    inflight: 0,
    queued: 0,
    ...fields,
  };
}

function snap(time, tenants, replicas = ["r1"]) {
  return { time, replicas: replicas.map((id) => ({ id })), queue_wait_bounds: BOUNDS, tenants };
}

test("rates and shares between two snapshots", () => {
  const a = snap(100, [tenant("a", { weight: 3 }), tenant("b")]);
  const b = snap(102, [
    tenant("a", { weight: 3, requests: { 200: 20, 429: 4 }, tokens: { prompt: 300, completion: 100, cached: 150 }, spend: { USD: 0.5 } }),
    tenant("b", { requests: { 200: 10, 502: 2 }, tokens: { prompt: 100, completion: 50 } }),
  ]);
  const p = tenantPoint(interval(a, b), "a");
  assert.equal(p.requests, 12);
  assert.equal(p.ok, 10);
  assert.equal(p.limited, 2);
  assert.equal(p.tokens, 200);
  assert.equal(p.cacheHit, 0.5);
  assert.equal(p.spendRate, 0.25);
  // served: a = 300 + 2 x 100 = 500, b = 100 + 2 x 50 = 200
  close(p.share, 500 / 700);
  assert.equal(p.entitled, 0.75);
  assert.equal(tenantPoint(interval(a, b), "b").errors, 1);
});

test("an idle tenant's weight goes to the active ones", () => {
  const a = snap(0, [tenant("a", { weight: 2 }), tenant("idle", { weight: 6 })]);
  const b = snap(1, [tenant("a", { weight: 2, requests: { 200: 1 }, tokens: { prompt: 10 } }), tenant("idle", { weight: 6 })]);
  const iv = interval(a, b);
  assert.equal(tenantPoint(iv, "a").entitled, 1);
  assert.equal(tenantPoint(iv, "idle").entitled, 0);
  // A tenant with requests queued but nothing served yet is active: it is owed its share.
  const c = snap(2, [tenant("a", { weight: 2, requests: { 200: 2 }, tokens: { prompt: 20 } }), tenant("idle", { weight: 6, queued: 3 })]);
  assert.equal(tenantPoint(interval(b, c), "a").entitled, 0.25);
  assert.equal(tenantPoint(interval(b, c), "idle").share, 0);
});

test("quantiles interpolate within the bucket, like histogram_quantile", () => {
  close(quantile(0.5, BOUNDS, [0, 10, 10], 10), 0.055);
  assert.equal(quantile(0.99, BOUNDS, [5, 5, 5], 10), 1); // beyond the last bound: the last bound
  assert.equal(quantile(0.5, BOUNDS, [0, 0, 0], 0), null);
  const a = snap(0, [tenant("a", { queue_wait: { count: 4, sum: 0, buckets: [4, 4, 4] } })]);
  const b = snap(1, [tenant("a", { queue_wait: { count: 8, sum: 0, buckets: [4, 8, 8] } })]);
  close(tenantPoint(interval(a, b), "a").waitP50, 0.055);
});

test("a change in the processes summed is a reset, not a rate", () => {
  const a = snap(0, [tenant("a", { requests: { 200: 100 } })], ["r1", "r2"]);
  const b = snap(2, [tenant("a", { requests: { 200: 40 } })], ["r1"]);
  const c = snap(4, [tenant("a", { requests: { 200: 60 } })], ["r1"]);
  assert.equal(interval(a, b), null);
  const all = intervals([a, b, c], 3);
  assert.equal(all[0], null);
  assert.equal(all[1], null);
  // The window for c starts after the change.
  assert.equal(tenantPoint(all[2], "a").requests, 10);
  // Counters that go backwards without a change of processes (a restart under the same id) too.
  assert.equal(interval(snap(0, [tenant("a", { requests: { 200: 9 } })]), snap(1, [tenant("a", { requests: { 200: 1 } })])), null);
});

test("Jain's index of served over entitled, among backlogged tenants", () => {
  const a = snap(0, [tenant("a", { weight: 3 }), tenant("b")]);
  const fair = snap(1, [tenant("a", { weight: 3, queued: 2, tokens: { prompt: 300 } }), tenant("b", { queued: 1, tokens: { prompt: 100 } })]);
  assert.ok(Math.abs(jain(interval(a, fair)) - 1) < 1e-12);
  const unfair = snap(1, [tenant("a", { weight: 3, queued: 2, tokens: { prompt: 100 } }), tenant("b", { queued: 1, tokens: { prompt: 300 } })]);
  assert.ok(jain(interval(a, unfair)) < 0.7);
  assert.equal(jain(null), null);
});

test("no contention, no index: nothing queued, or one tenant alone", () => {
  const a = snap(0, [tenant("a", { weight: 3 }), tenant("b")]);
  // Light traffic whose shares are far from the weights: both got all they asked for.
  const light = snap(1, [tenant("a", { weight: 3, tokens: { prompt: 100 } }), tenant("b", { tokens: { prompt: 300 } })]);
  assert.deepEqual(contenders(interval(a, light)), []);
  assert.equal(jain(interval(a, light)), null);
  const alone = snap(1, [tenant("a", { weight: 3, queued: 4, tokens: { prompt: 100 } }), tenant("b", { tokens: { prompt: 300 } })]);
  assert.deepEqual(contenders(interval(a, alone)), ["a"]);
  assert.equal(jain(interval(a, alone)), null);
});

test("backlogged: queued at either end, or waits longer than the first bucket in between", () => {
  const a = snap(0, [tenant("then", { queued: 2 }), tenant("waited"), tenant("quick")]);
  const b = snap(1, [
    tenant("then", { tokens: { prompt: 10 } }),
    tenant("waited", { tokens: { prompt: 10 }, queue_wait: { count: 3, sum: 0.2, buckets: [1, 3, 3] } }),
    tenant("quick", { tokens: { prompt: 10 }, queue_wait: { count: 5, sum: 0, buckets: [5, 5, 5] } }),
  ]);
  assert.deepEqual(contenders(interval(a, b)).sort(), ["then", "waited"]);
});

test("only the top priority band with a backlog contends", () => {
  const a = snap(0, [tenant("hi1", { priority: 5 }), tenant("hi2", { priority: 5 }), tenant("lo", { priority: 0 })]);
  const b = snap(1, [
    tenant("hi1", { priority: 5, queued: 1, tokens: { prompt: 100 } }),
    tenant("hi2", { priority: 5, queued: 1, tokens: { prompt: 100 } }),
    tenant("lo", { priority: 0, queued: 9 }),
  ]);
  assert.deepEqual(contenders(interval(a, b)).sort(), ["hi1", "hi2"]);
  assert.ok(Math.abs(jain(interval(a, b)) - 1) < 1e-12);
});
