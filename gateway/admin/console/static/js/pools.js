// From snapshots of GET /admin/stats to each backend pool's figures: per engine endpoint, requests/s and
// the prefix-cache hit ratio between polls, whether requests keep waiting inside the engine, and each
// pool's series for its chart. Pure functions (no DOM), so tests/browser/pools.test.mjs checks them
// under Node.

import { replicaKey } from "./rates.js";

// Requests waiting inside an engine must have averaged above 1 over this long (and three polls) before
// the page warns: one burst the capacity control is already draining is not a queue.
export const QUEUEING_S = 20;

function endpointsOf(snapshot) {
  const out = new Map();
  for (const backend of snapshot.backends || []) {
    for (const e of backend.endpoints) out.set(`${backend.name} ${e.id}`, e);
  }
  return out;
}

/**
 * Per endpoint ("backend endpoint"), what it served between snapshots `a` (older) and `b`: requests and
 * prompt tokens per second and the share of the prompt its prefix cache held (null without prompt
 * tokens). Null when the processes summed changed in between; an endpoint whose counters went back is
 * left out (its process restarted under the same id).
 */
export function endpointRates(a, b) {
  const dt = b.time - a.time;
  if (dt <= 0 || replicaKey(a) !== replicaKey(b)) return null;
  const before = endpointsOf(a);
  const out = new Map();
  for (const [key, e] of endpointsOf(b)) {
    const old = before.get(key) || { requests: 0, prompt_tokens: 0, cached_tokens: 0 };
    const requests = e.requests - old.requests;
    const prompt = e.prompt_tokens - old.prompt_tokens;
    const cached = e.cached_tokens - old.cached_tokens;
    if (requests < 0 || prompt < 0 || cached < 0) continue;
    out.set(key, { requests: requests / dt, prompt: prompt / dt, cacheHit: prompt > 0 ? cached / prompt : null });
  }
  return out;
}

/** The rates over the last few snapshots (up to `window` polls back, after any change of processes). */
export function latestEndpointRates(history, window = 3) {
  const last = history.length - 1;
  for (let j = Math.max(0, last - window); j < last; j += 1) {
    const found = endpointRates(history[j], history[last]);
    if (found !== null) return found;
  }
  return new Map();
}

/**
 * Whether requests keep waiting inside an engine: its own waiting count, averaged over the snapshots
 * of the last `seconds`, is above 1 (GatewayEngineQueueGrowing's rule, over a shorter window). The
 * engine then serves them first come first served, blind to the tenants' weights.
 */
export function queueing(history, backend, endpoint, seconds = QUEUEING_S) {
  const latest = history[history.length - 1];
  if (!latest) return false;
  const key = `${backend} ${endpoint}`;
  const readings = [];
  for (let i = history.length - 1; i >= 0 && history[i].time >= latest.time - seconds; i -= 1) {
    const e = endpointsOf(history[i]).get(key);
    if (e && e.waiting !== null && e.waiting !== undefined) readings.push(e.waiting);
  }
  return readings.length >= 3 && readings.reduce((x, y) => x + y, 0) / readings.length > 1;
}

/**
 * One pool over the history, for its chart: per snapshot, the permits held at its endpoints, its limit
 * and the requests waiting inside its engines (null where it did not report them).
 */
export function poolSeries(history, name) {
  const permits = [];
  const limit = [];
  const waiting = [];
  for (const snapshot of history) {
    const backend = (snapshot.backends || []).find((b) => b.name === name);
    const inPool = backend ? backend.endpoints.filter((e) => e.limit !== null) : [];
    const sum = (field) => {
      const known = inPool.filter((e) => e[field] !== null && e[field] !== undefined);
      return known.length ? known.reduce((x, e) => x + e[field], 0) : null;
    };
    permits.push(sum("permits"));
    limit.push(backend ? backend.limit : null);
    waiting.push(sum("waiting"));
  }
  return { permits, limit, waiting };
}
