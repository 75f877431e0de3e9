// The Backends page's arithmetic on /admin/stats snapshots (gateway/admin/console/static/js/pools.js), under
// Node's test runner: each engine's rates and hit ratio, counter resets, the queue-inside-the-engine
// warning, and a pool's chart series.

import assert from "node:assert/strict";
import { test } from "node:test";

import { endpointRates, latestEndpointRates, poolSeries, QUEUEING_S, queueing } from "../../gateway/admin/console/static/js/pools.js";

function endpoint(id, fields = {}) {
  return { id, limit: 4, permits: 0, running: 0, waiting: 0, kv_cache_usage: 0, requests: 0, prompt_tokens: 0, cached_tokens: 0, ...fields };
}

function snap(time, endpoints, { replicas = ["r1"], limit = 8, name = "pool" } = {}) {
  return { time, replicas: replicas.map((id) => ({ id })), tenants: [], backends: [{ name, limit, waiting_tenants: 0, endpoints }] };
}

test("requests per second and the prefix-cache hit ratio, per engine", () => {
  const a = snap(100, [endpoint("e1", { requests: 10, prompt_tokens: 1000, cached_tokens: 200 }), endpoint("e2")]);
  const b = snap(102, [endpoint("e1", { requests: 30, prompt_tokens: 3000, cached_tokens: 1700 }), endpoint("e2", { requests: 4, prompt_tokens: 0 })]);
  const rates = endpointRates(a, b);
  assert.deepEqual(rates.get("pool e1"), { requests: 10, prompt: 1000, cacheHit: 0.75 });
  // No prompt tokens in the interval: no ratio, not 0%.
  assert.deepEqual(rates.get("pool e2"), { requests: 2, prompt: 0, cacheHit: null });
  // An endpoint that joined in between counts from zero.
  const c = snap(104, [...b.backends[0].endpoints, endpoint("e3", { requests: 6 })]);
  assert.equal(endpointRates(b, c).get("pool e3").requests, 3);
});

test("a change in the processes summed, or a counter going back, is no rate", () => {
  const a = snap(0, [endpoint("e1", { requests: 50 })], { replicas: ["r1", "r2"] });
  const b = snap(2, [endpoint("e1", { requests: 20 })]);
  const c = snap(4, [endpoint("e1", { requests: 30 })]);
  assert.equal(endpointRates(a, b), null);
  // The window starts after the change.
  assert.equal(latestEndpointRates([a, b, c]).get("pool e1").requests, 5);
  assert.equal(endpointRates(snap(0, [endpoint("e1", { requests: 9 })]), snap(1, [endpoint("e1", { requests: 1 })])).has("pool e1"), false);
  assert.equal(latestEndpointRates([c]).size, 0);
  // A snapshot of a gateway that reports no pools.
  assert.equal(endpointRates({ time: 0, replicas: [{ id: "r1" }], tenants: [] }, b).get("pool e1").requests, 10);
});

test("the warning needs requests waiting inside the engine, above 1 on average, for a while", () => {
  const history = (waits) => waits.map((w, i) => snap(1000 + 2 * i, [endpoint("e1", { waiting: w }), endpoint("e2")]));
  assert.equal(queueing(history([2, 3, 2, 2]), "pool", "e1"), true);
  assert.equal(queueing(history([2, 3, 2, 2]), "pool", "e2"), false);
  // A burst the capacity control drains at once.
  assert.equal(queueing(history([0, 0, 0, 0, 0, 0, 6, 0]), "pool", "e1"), false);
  // Exactly 1 on average does not "stay above 1"; two readings are too few to say.
  assert.equal(queueing(history([1, 1, 1, 1]), "pool", "e1"), false);
  assert.equal(queueing(history([5, 5]), "pool", "e1"), false);
  // Only the last QUEUEING_S seconds count: a queue that drained long ago is no warning.
  const drained = history([...Array(10).fill(5), ...Array(QUEUEING_S / 2 + 1).fill(0)]);
  assert.equal(queueing(drained, "pool", "e1"), false);
  // An engine whose metrics the gateway does not read has no waiting figure: no warning.
  assert.equal(queueing(history([null, null, null, null]), "pool", "e1"), false);
  assert.equal(queueing([], "pool", "e1"), false);
});

test("a pool's chart: permits and waiting summed over the endpoints in the pool, and its limit", () => {
  const history = [
    snap(0, [endpoint("e1", { permits: 3, waiting: 1 }), endpoint("e2", { permits: 4 }), endpoint("gone", { limit: null, permits: null })]),
    snap(2, [endpoint("e1", { permits: 4, running: null, waiting: null }), endpoint("e2", { permits: 4, waiting: null })], { limit: 6 }),
    { time: 4, replicas: [{ id: "r1" }], tenants: [], backends: [] },
  ];
  assert.deepEqual(poolSeries(history, "pool"), { permits: [7, 8, null], limit: [8, 6, null], waiting: [1, null, null] });
});
