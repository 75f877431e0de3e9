// From cumulative snapshots of GET /admin/stats to what the charts show: rates, shares, quantiles.
// Pure functions (no DOM), so tests/browser/rates.test.mjs checks them under Node.
//
// A point of a chart is the interval between a snapshot and one up to `window` snapshots earlier. If the
// set of gateway processes summed changed in between (one started or died), the sums jumped like a
// Prometheus counter reset: the interval starts after the change instead, or the point is left empty.

export const REASONS = ["rpm", "tpm", "concurrency", "inflight_tokens", "budget", "queue_full", "queue_timeout"];

/** The processes a snapshot sums, as one comparable string. */
export function replicaKey(snapshot) {
  return snapshot.replicas.map((r) => r.id).sort().join(" ");
}

function diff(newer, older) {
  const out = {};
  for (const [name, value] of Object.entries(newer || {})) out[name] = value - ((older || {})[name] || 0);
  return out;
}

function anyNegative(values) {
  return Object.values(values).some((v) => v < -1e-9);
}

/** What one tenant did between snapshots `a` (older) and `b`; null if its counters went backwards. */
export function tenantDelta(a, b, dt) {
  const empty = { requests: {}, tokens: {}, rejections: {}, spend: {}, queue_wait: { count: 0, buckets: [] } };
  const old = a || empty;
  const requests = diff(b.requests, old.requests);
  const tokens = diff(b.tokens, old.tokens);
  const rejections = diff(b.rejections, old.rejections);
  const spend = diff(b.spend, old.spend);
  const waitCount = b.queue_wait.count - (old.queue_wait.count || 0);
  const waitBuckets = b.queue_wait.buckets.map((n, i) => n - (old.queue_wait.buckets[i] || 0));
  if ([requests, tokens, rejections, spend].some(anyNegative) || waitCount < 0) return null;
  // Backlogged in the interval: requests queued at either end, or requests that waited for a slot in
  // between (longer than the first bucket, 1 ms: a request that finds a free slot waits ~0).
  const waited = waitCount - (waitBuckets[0] || 0);
  const backlogged = b.queued > 0 || (old.queued || 0) > 0 || waited > 0;
  let ok = 0;
  let limited = 0;
  let errors = 0;
  for (const [status, n] of Object.entries(requests)) {
    if (status.startsWith("2")) ok += n;
    else if (status === "429") limited += n;
    else errors += n;
  }
  const prompt = tokens.prompt || 0;
  const completion = tokens.completion || 0;
  const cached = tokens.cached || 0;
  return {
    dt,
    requests: ok + limited + errors,
    ok,
    limited,
    errors,
    prompt,
    completion,
    cached,
    // The fair queue's measure of service (VTC): prompt + 2 x completion tokens.
    served: prompt + 2 * completion,
    rejections,
    spend,
    waitCount,
    waitBuckets,
    inflight: b.inflight,
    queued: b.queued,
    backlogged,
    weight: b.weight,
    priority: b.priority,
  };
}

/**
 * The q-quantile of a cumulative histogram (Prometheus' histogram_quantile: linear within a bucket).
 * `buckets[i]` counts observations <= bounds[i]; `count` includes those above the last bound.
 */
export function quantile(q, bounds, buckets, count) {
  if (!count || count <= 0) return null;
  const rank = q * count;
  for (let i = 0; i < bounds.length; i += 1) {
    if (buckets[i] >= rank) {
      const lower = i === 0 ? 0 : bounds[i - 1];
      const below = i === 0 ? 0 : buckets[i - 1];
      const inside = buckets[i] - below;
      if (inside <= 0) return bounds[i];
      return lower + ((bounds[i] - lower) * (rank - below)) / inside;
    }
  }
  return bounds[bounds.length - 1];
}

/** Every tenant's activity between two snapshots, with its share of the service and its entitlement. */
export function interval(a, b) {
  const dt = b.time - a.time;
  if (dt <= 0 || replicaKey(a) !== replicaKey(b)) return null;
  const before = new Map(a.tenants.map((t) => [t.id, t]));
  const tenants = new Map();
  let served = 0;
  for (const t of b.tenants) {
    const d = tenantDelta(before.get(t.id), t, dt);
    if (d === null) return null;
    tenants.set(t.id, d);
    served += d.served;
  }
  // Entitlement: the tenant's weight over the weights of the tenants active in the interval (served,
  // answered, or still waiting); an idle tenant's share goes to the others (the queue is work-conserving).
  let weights = 0;
  for (const d of tenants.values()) {
    d.active = d.requests > 0 || d.served > 0 || d.queued > 0 || d.inflight > 0;
    if (d.active) weights += d.weight;
  }
  for (const d of tenants.values()) {
    d.share = served > 0 ? d.served / served : null;
    d.entitled = d.active && weights > 0 ? d.weight / weights : 0;
  }
  return { time: b.time, dt, served, tenants, bounds: b.queue_wait_bounds };
}

/** One interval per snapshot of `history` (null where there is none): the point for snapshot i spans
 * from up to `window` snapshots earlier, starting after any change in the processes summed. */
export function intervals(history, window = 3) {
  const out = [];
  for (let i = 0; i < history.length; i += 1) {
    let found = null;
    for (let j = Math.max(0, i - window); j < i && found === null; j += 1) {
      found = interval(history[j], history[i]);
    }
    out.push(found);
  }
  return out;
}

/** Per-second rates and ratios of one tenant in one interval (null values where there is no data). */
export function tenantPoint(iv, id) {
  const d = iv && iv.tenants.get(id);
  if (!d) return null;
  const perS = (n) => n / d.dt;
  const rejections = {};
  for (const reason of REASONS) rejections[reason] = perS(d.rejections[reason] || 0);
  const spend = Object.values(d.spend).reduce((x, y) => x + y, 0);
  return {
    requests: perS(d.requests),
    ok: perS(d.ok),
    limited: perS(d.limited),
    errors: perS(d.errors),
    prompt: perS(d.prompt),
    completion: perS(d.completion),
    cached: perS(d.cached),
    tokens: perS(d.prompt + d.completion),
    share: d.share,
    entitled: d.entitled,
    active: d.active,
    waitP50: quantile(0.5, iv.bounds, d.waitBuckets, d.waitCount),
    waitP99: quantile(0.99, iv.bounds, d.waitBuckets, d.waitCount),
    rejections,
    rejected: perS(d.limited),
    cacheHit: d.prompt > 0 ? d.cached / d.prompt : null,
    spendRate: perS(spend),
    inflight: d.inflight,
    queued: d.queued,
  };
}

/**
 * The tenants that contended for capacity in an interval: those backlogged (requests queued) in the
 * highest priority band that had any, since bands are served in order and weights apply within one.
 */
export function contenders(iv) {
  if (!iv) return [];
  const backlogged = [...iv.tenants.entries()].filter(([, d]) => d.backlogged);
  if (!backlogged.length) return [];
  const band = Math.max(...backlogged.map(([, d]) => d.priority));
  return backlogged.filter(([, d]) => d.priority === band).map(([id]) => id);
}

/**
 * Jain's fairness index among the contenders (1 = served exactly by weight): each one's share of the
 * service they got together, over its weight's share of their weights. Null when fewer than two
 * contended: a tenant that is not backlogged asked for less than its share and got all it asked for, so
 * comparing its share with its weight says nothing about fairness.
 */
export function jain(iv) {
  const ids = contenders(iv);
  if (ids.length < 2) return null;
  const ds = ids.map((id) => iv.tenants.get(id));
  const served = ds.reduce((x, d) => x + d.served, 0);
  const weights = ds.reduce((x, d) => x + d.weight, 0);
  if (served <= 0 || weights <= 0) return null;
  const xs = ds.map((d) => d.served / served / (d.weight / weights));
  const s = xs.reduce((x, y) => x + y, 0);
  const s2 = xs.reduce((x, y) => x + y * y, 0);
  return s2 > 0 ? (s * s) / (xs.length * s2) : null;
}
