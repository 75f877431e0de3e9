// One poll of GET /admin/stats every few seconds while signed in, shared by every view: the history of
// snapshots (five minutes) stays when the operator moves between pages, so charts open full.

import { api } from "./api.js";
import { intervals } from "./rates.js";

export const POLL_MS = 2000;
const KEEP = 150;

const history = [];
let derived = [];
let timer = null;
let running = false;
let lastError = null;
let busy = false;
const subscribers = new Set();

export function subscribe(fn) {
  subscribers.add(fn);
  if (history.length) fn(state());
  return () => subscribers.delete(fn);
}

export function state() {
  return { history, intervals: derived, latest: history[history.length - 1] || null, error: lastError };
}

function publish() {
  const s = state();
  for (const fn of subscribers) fn(s);
}

async function tick() {
  if (busy) return; // the poll in flight schedules the next one
  busy = true;
  try {
    const snapshot = await api("GET", "/admin/stats");
    lastError = null;
    history.push(snapshot);
    if (history.length > KEEP) history.splice(0, history.length - KEEP);
    derived = intervals(history);
  } catch (err) {
    lastError = err;
  } finally {
    busy = false;
  }
  if (running) {
    publish();
    timer = setTimeout(tick, POLL_MS);
  }
}

export function start() {
  if (running) return;
  running = true;
  tick();
}

export function stop() {
  running = false;
  clearTimeout(timer);
  history.length = 0;
  derived = [];
  lastError = null;
}

/** Poll now (after a change the operator made), without waiting for the next tick. */
export function refresh() {
  if (!running) return;
  clearTimeout(timer);
  tick();
}
