// How numbers read on the page: short, with units, and an en dash where there is no value yet.

export const NONE = "–";

const compact = new Intl.NumberFormat("en", { notation: "compact", maximumFractionDigits: 1 });

export function num(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(value)) return NONE;
  if (Math.abs(value) >= 10000) return compact.format(value);
  const rounded = Math.abs(value) < 10 ? value.toFixed(digits) : value.toFixed(0);
  return rounded.replace(/\.0+$/, "");
}

export function rate(value) {
  return value === null || value === undefined ? NONE : `${num(value)}/s`;
}

export function pct(value, digits = 0) {
  if (value === null || value === undefined || !Number.isFinite(value)) return NONE;
  return `${(value * 100).toFixed(digits)}%`;
}

export function ms(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return NONE;
  const value = seconds * 1000;
  if (value === 0) return "0 ms";
  if (value >= 10000) return `${(value / 1000).toFixed(1)} s`;
  return `${value < 10 ? value.toFixed(1) : value.toFixed(0)} ms`;
}

export function money(amount, currency = "USD") {
  if (amount === null || amount === undefined || !Number.isFinite(amount)) return NONE;
  const digits = amount !== 0 && Math.abs(amount) < 1 ? 4 : 2;
  try {
    return new Intl.NumberFormat("en", {
      style: "currency",
      currency,
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    }).format(amount);
  } catch {
    return `${amount.toFixed(digits)} ${currency}`;
  }
}

export function when(unixSeconds) {
  if (!unixSeconds) return NONE;
  const date = new Date(unixSeconds * 1000);
  return date.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "short" });
}

export function limits(l) {
  const parts = [];
  if (l.rpm) parts.push(`${num(l.rpm)} rpm`);
  if (l.tpm) parts.push(`${num(l.tpm)} tpm`);
  if (l.max_concurrency) parts.push(`${l.max_concurrency} concurrent`);
  if (l.max_inflight_tokens) parts.push(`${num(l.max_inflight_tokens)} in-flight tokens`);
  if (l.max_queue_wait_ms !== null && l.max_queue_wait_ms !== undefined) parts.push(`wait ≤ ${ms(l.max_queue_wait_ms / 1000)}`);
  if (l.max_queue_depth !== null && l.max_queue_depth !== undefined) parts.push(`queue ≤ ${l.max_queue_depth}`);
  return parts.length ? parts.join(" · ") : "No limits";
}

export function budget(b) {
  return b ? `${money(b.amount)} per ${b.period}` : "No budget";
}
