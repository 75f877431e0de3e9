// The admin API client. The admin key lives in this module's memory only: never in a cookie, storage or
// the URL. It goes out as `Authorization: Bearer`, which a cross-site page cannot make the browser send,
// so no change can be forged (no CSRF), and reloading the page forgets it.

let adminKey = null;
const listeners = new Set();

export function signedIn() {
  return adminKey !== null;
}

export function signIn(key) {
  adminKey = key;
}

export function signOut(reason = null) {
  adminKey = null;
  for (const fn of listeners) fn(reason);
}

/** Called with a reason when the session ends (sign-out, or the key stopped working). */
export function onSignOut(fn) {
  listeners.add(fn);
}

/** An answer that is not 2xx, with the OpenAI-shaped error's fields. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `The gateway answered ${status}.`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
    this.type = error.type || null;
  }
}

/** Call the admin API; resolves to the parsed JSON body (null for 204), rejects with ApiError. */
export async function api(method, path, body = undefined, { key = adminKey, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (key !== null) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: "The gateway did not answer. Is it running, and is this the right address?" });
  }
  if (response.status === 204) return null;
  let parsed = null;
  try {
    parsed = await response.json();
  } catch {
    parsed = null;
  }
  if (response.ok) return parsed;
  const error = new ApiError(response.status, (parsed && parsed.error) || {});
  if (response.status === 401 && key === adminKey && adminKey !== null) {
    signOut("The admin key is no longer accepted. Sign in again.");
  }
  throw error;
}

/** Every tenant, following the pagination. */
export async function allTenants() {
  const tenants = [];
  let after = null;
  for (;;) {
    const query = new URLSearchParams({ limit: "1000" });
    if (after) query.set("after", after);
    const page = await api("GET", `/admin/tenants?${query}`);
    tenants.push(...page.data);
    if (!page.has_more) return tenants;
    after = page.next_after;
  }
}

export const path = {
  tenant: (id) => `/admin/tenants/${encodeURIComponent(id)}`,
  keys: (id) => `/admin/tenants/${encodeURIComponent(id)}/keys`,
  key: (id) => `/admin/keys/${encodeURIComponent(id)}`,
  usage: (id, since) => `/admin/tenants/${encodeURIComponent(id)}/usage?since=${encodeURIComponent(since)}`,
};
