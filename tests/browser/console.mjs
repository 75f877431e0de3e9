// The admin console as an operator uses it, in Debian's Chromium driven by playwright-core.
// Run by tests/test_console.py: node console.mjs <config.json>. The config names the gateway, the admin
// key, a second tenant's key for the load, and where screenshots go. The script signs in, creates a
// tenant and keys (each secret seen once), revokes and rotates, runs a load for two tenants while it
// watches the live view, the fairness view and the backends view (a pool of two engines), and prints what
// it saw as one JSON line; the Python test asserts on it. Every browser request to anything but the gateway's origin is refused and recorded.
// Along the way it records the body of every PATCH the page sends, checks the charts' time labels fit
// their canvas, and ends on the admin API reference (api.html).

import { readFileSync } from "node:fs";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const { url, adminKey, betaKey, model, shots } = config;
const origin = new URL(url).origin;
const seen = { external: [], consoleErrors: [], requests: 0, steps: [] };
const step = (name, data = {}) => seen.steps.push({ name, at: Date.now(), ...data });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Without the background-networking flags Chromium tries to reach Google's services at start-up.
const profile = mkdtempSync(join(tmpdir(), "console-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: config.chromium || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const context = browser;
await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin });
await context.route("**/*", (route) => {
  const target = route.request().url();
  seen.requests += 1;
  if (new URL(target).origin !== origin) {
    seen.external.push(target);
    return route.abort();
  }
  return route.continue();
});
let page = context.pages()[0] || (await context.newPage());
seen.patches = [];
page.on("request", (r) => {
  if (r.method() === "PATCH") seen.patches.push({ path: new URL(r.url()).pathname, body: r.postDataJSON() });
});
page.on("console", (m) => {
  // The API's refusals the scenario provokes (401, 422) are logged by Chromium as failed loads: expected.
  if (/^Failed to load resource: the server responded with a status of 4\d\d/.test(m.text())) return;
  if (m.type() === "error" || m.type() === "warning") seen.consoleErrors.push(`${m.type()}: ${m.text()}`);
});
page.on("pageerror", (e) => seen.consoleErrors.push(`pageerror: ${e.message}`));
page.setDefaultTimeout(20000);

async function shot(name, fullPage = false) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage });
}

/** Inputs, selects and textareas on the page without a label, and buttons and links without a name. */
async function unlabelled() {
  return page.evaluate(() => {
    const bad = [];
    for (const el of document.querySelectorAll("input, select, textarea")) {
      if (el.type === "hidden") continue;
      if (!(el.labels && el.labels.length) && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby")) {
        bad.push(el.outerHTML.slice(0, 120));
      }
    }
    for (const el of document.querySelectorAll("button, a[href]")) {
      if (!el.textContent.trim() && !el.getAttribute("aria-label") && !el.querySelector("img[alt]:not([alt=''])")) {
        bad.push(el.outerHTML.slice(0, 120));
      }
    }
    return bad;
  });
}
const a11y = {};
const counts = { acme: {}, beta: {} };
let stopLoad = false;

async function tileValue(name) {
  const v = await page.locator(`[data-tile="${name}"]`).getAttribute("data-value");
  return v === "" || v === null ? null : Number(v);
}

/** The admin API from the script itself (not the page), to set up what the page must then keep. */
async function adminCall(method, path, body) {
  const r = await fetch(`${url}${path}`, {
    method,
    headers: { Authorization: `Bearer ${adminKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return r.json();
}

/**
 * Charts whose time axis has ink in the canvas's first or last two pixel columns: a label cut by the
 * edge. (The plot area stops short of both edges, so ticks and grid lines never reach them.)
 */
async function cutTimeLabels() {
  return page.evaluate(() =>
    [...document.querySelectorAll("[data-chart]")]
      .filter((card) => {
        const canvas = card.querySelector(".chart-plot canvas");
        if (!canvas || !canvas.width || card.querySelector(".chart-plot").hidden) return false;
        // Read from a copy, so the chart's own canvas is never read back (Chromium warns when it is).
        const copy = document.createElement("canvas");
        copy.width = canvas.width;
        copy.height = canvas.height;
        const ctx = copy.getContext("2d", { willReadFrequently: true });
        ctx.drawImage(canvas, 0, 0);
        const inked = (x) => ctx.getImageData(x, 0, 2, canvas.height).data.some((v, i) => i % 4 === 3 && v > 0);
        return inked(0) || inked(canvas.width - 2);
      })
      .map((card) => card.dataset.chart),
  );
}

async function chartState(name) {
  const el = page.locator(`[data-chart="${name}"]`);
  return { points: Number(await el.getAttribute("data-points")), last: (await el.getAttribute("data-last")) || "" };
}

try {
  // --- sign in (keyboard only), with a wrong key first ------------------------------------------------

  await page.goto(`${url}/console/`);
  await page.getByRole("heading", { name: "Gateway console" }).waitFor();
  await shot("01-login");
  seen.loginFocused = await page.evaluate(() => document.activeElement && document.activeElement.name);
  await page.keyboard.type("sk-not-the-admin-key");
  await page.keyboard.press("Enter");
  const loginError = page.locator('[data-param="admin_key"] .field-error');
  await loginError.waitFor({ state: "visible" });
  seen.loginError = await loginError.textContent();
  seen.loginInvalid = await page.locator("input[name=admin_key]").getAttribute("aria-invalid");
  await shot("02-login-error");
  await page.locator("input[name=admin_key]").fill("");
  await page.keyboard.type(adminKey);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Tenants", level: 1 }).waitFor();
  step("signed in");

  // Backwards from the page's heading, the keyboard reaches the header's controls and then the skip
  // link, which lands in <main>. The page moves focus to its heading as it draws it; wait for that
  // before pressing anything, or a slow machine's late focus move would restart the walk.
  await page.waitForFunction(() => document.activeElement && document.activeElement.tagName === "H1");
  seen.headingFocused = await page.evaluate(() => document.activeElement.textContent.trim());
  seen.tabOrder = [];
  for (let i = 0; i < 8; i += 1) {
    await page.keyboard.press("Shift+Tab");
    const at = await page.evaluate(() => ({ id: document.activeElement.id, text: document.activeElement.textContent.trim() }));
    seen.tabOrder.push(at.text);
    if (at.id === "skip-link") break;
  }
  await page.keyboard.press("Enter");
  seen.afterSkip = await page.evaluate(() => document.activeElement.id);

  // --- create a tenant: first with an invalid weight, shown next to its field -------------------------

  await page.getByRole("link", { name: "New tenant" }).click();
  await page.getByRole("heading", { name: "New tenant", level: 1 }).waitFor();
  await page.getByLabel("Tenant id").fill("acme");
  await page.getByLabel("Display name").fill("Acme Research");
  await page.getByLabel("Weight").fill("0");
  await page.getByLabel("Requests per minute").fill("6000");
  await page.getByLabel("Concurrent requests").fill("12");
  await page.getByLabel("In-flight tokens").fill("2000");
  await page.getByLabel("Budget amount").fill("5");
  await page.getByLabel("Budget period").selectOption("day");
  a11y.tenantForm = await unlabelled();
  await page.getByRole("button", { name: "Create tenant" }).click();
  const weightError = page.locator('[data-param="weight"] .field-error');
  await weightError.waitFor({ state: "visible" });
  seen.weightError = await weightError.textContent();
  seen.weightFocused = await page.evaluate(() => document.activeElement.name);
  seen.weightDescribedBy = await page.evaluate(() => {
    const input = document.querySelector("input[name=weight]");
    return (input.getAttribute("aria-describedby") || "").split(" ").some((id) => document.getElementById(id)?.classList.contains("field-error"));
  });
  await shot("03-tenant-form-error");
  await page.getByLabel("Weight").fill("3");
  await page.getByRole("button", { name: "Create tenant" }).click();
  await page.waitForURL(/#\/tenants\/acme\/keys$/);
  await page.getByRole("heading", { name: "New key" }).waitFor();
  step("tenant created");

  // --- keys: create (seen once, copied), revoke, create another and rotate it ------------------------

  async function createKey(name) {
    await page.getByLabel("Key name").fill(name);
    await page.getByRole("button", { name: "Create key" }).click();
    const dialog = page.locator("dialog[data-dialog=secret]");
    await dialog.waitFor({ state: "visible" });
    const secret = await page.locator("#secret-value").inputValue();
    return { dialog, secret };
  }

  async function closeSecret(dialog) {
    await page.getByRole("button", { name: "Done" }).click();
    await dialog.waitFor({ state: "detached" });
  }

  async function pageHolds(secret) {
    return page.evaluate(
      (s) => document.documentElement.outerHTML.includes(s) || [...document.querySelectorAll("input, textarea")].some((el) => el.value.includes(s)),
      secret,
    );
  }

  const first = await createKey("ci");
  seen.secretShape = /^sk-gw-[A-Za-z0-9_-]{43}$/.test(first.secret);
  seen.secretFocused = await page.evaluate(() => document.activeElement.id);
  await page.getByRole("button", { name: "Copy key" }).click();
  await page.getByText("Copied to the clipboard.").waitFor();
  seen.clipboardMatches = (await page.evaluate(() => navigator.clipboard.readText())) === first.secret;
  a11y.secretDialog = await unlabelled();
  await shot("04-key-secret");
  await closeSecret(first.dialog);
  seen.secretGoneFromPage = !(await pageHolds(first.secret));
  const ciRow = page.locator("tr", { has: page.getByRole("rowheader", { name: /^ci/ }) });
  seen.ciStateBefore = await ciRow.getAttribute("data-state");
  const works = async (secret) =>
    (await fetch(`${url}/v1/models`, { headers: { Authorization: `Bearer ${secret}` } })).status;
  seen.ciStatusBefore = await works(first.secret);

  // Revoke from the keyboard: the dialog opens on Enter, starts on Cancel, and Escape backs out.
  await ciRow.getByRole("button", { name: "Revoke ci" }).focus();
  await page.keyboard.press("Enter");
  const confirm = page.locator("dialog[open]");
  await confirm.waitFor();
  seen.revokeDialogFocus = await page.evaluate(() => document.activeElement.textContent.trim());
  await page.keyboard.press("Escape");
  await confirm.waitFor({ state: "detached" });
  seen.focusAfterEscape = await page.evaluate(() => document.activeElement.textContent.trim());
  await ciRow.getByRole("button", { name: "Revoke ci" }).click();
  await page.locator("dialog[open]").getByRole("button", { name: "Revoke key" }).click();
  await page.locator('tr[data-state="revoked"]').waitFor();
  seen.ciStateAfter = await page.locator("tr", { has: page.getByRole("rowheader", { name: /^ci/ }) }).getAttribute("data-state");
  seen.ciStatusAfter = await works(first.secret);
  step("key revoked");

  const second = await createKey("load");
  await closeSecret(second.dialog);
  const loadRow = page.locator('tr[data-state="active"]', { has: page.getByRole("rowheader", { name: /^load/ }) });
  await loadRow.getByRole("button", { name: "Rotate load" }).click();
  await page.locator("dialog[open]").getByLabel("The old key keeps working for").selectOption("3600");
  await page.locator("dialog[open]").getByRole("button", { name: "Rotate key" }).click();
  const rotated = page.locator("dialog[data-dialog=secret]");
  await rotated.waitFor({ state: "visible" });
  const third = await page.locator("#secret-value").inputValue();
  await closeSecret(rotated);
  await page.locator('tr[data-state="expiring"]').waitFor();
  seen.rotatedStates = await page.locator("tbody tr").evaluateAll((rows) => rows.map((r) => r.dataset.state));
  seen.rotatedDiffers = third !== second.secret;
  seen.oldKeyInGrace = await works(second.secret);
  seen.newKeyWorks = await works(third);
  a11y.keys = await unlabelled();
  await shot("05-keys");
  step("key rotated");

  // --- light traffic: both tenants active, nothing queued: no contention to judge --------------------

  let stopLight = false;
  async function light(key, tokens) {
    while (!stopLight) {
      const r = await fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify({ model, max_tokens: tokens, messages: [{ role: "user", content: "hello" }] }),
      });
      await r.arrayBuffer();
      await sleep(150);
    }
  }
  // One request at a time each, on four backend slots; acme (weight 3) asks for less than beta.
  const lightLoops = [light(third, 2), light(betaKey, 12)];
  await page.getByRole("link", { name: "Fairness" }).click();
  await page.getByRole("heading", { name: "Fairness", level: 1 }).waitFor();
  await page.waitForFunction(
    () => ["acme", "beta"].every((t) => document.querySelector(`tr[data-tenant="${t}"]`)) && document.querySelector('[data-tile="jain"]').dataset.state,
    null,
    { timeout: 30000 },
  );
  await sleep(2500);
  seen.uncontended = await page.evaluate(() => {
    const tile = document.querySelector('[data-tile="jain"]');
    return { state: tile.dataset.state, text: tile.textContent, value: tile.dataset.value, sub: tile.nextElementSibling.textContent };
  });
  await shot("07a-fairness-no-contention");
  stopLight = true;
  await Promise.all(lightLoops);
  step("no contention seen");

  // --- a load for two tenants; the live view and the fairness view must move -------------------------

  const counts = { acme: {}, beta: {} };
  const loadDeadline = Date.now() + 90000; // bounded whatever happens
  // A shared prefix of several KV blocks, so the backends' prefix cache reports cached tokens.
  const prefix = Array.from({ length: 64 }, (_, i) => `word${i}`).join(" ");
  async function loop(tenant, key, n) {
    let i = 0;
    while (!stopLoad && Date.now() < loadDeadline) {
      i += 1;
      const started = Date.now();
      let status = 0;
      try {
        const r = await fetch(`${url}/v1/chat/completions`, {
          method: "POST",
          headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
          body: JSON.stringify({ model, max_tokens: 12, messages: [{ role: "user", content: `${prefix} question ${n}-${i}` }] }),
        });
        status = r.status;
        await r.arrayBuffer();
      } catch {
        status = -1;
      }
      counts[tenant][status] = (counts[tenant][status] || 0) + 1;
      // Refused at once: pause like a polite client instead of spinning.
      if (status !== 200) await sleep(Math.max(0, 100 - (Date.now() - started)));
    }
  }
  // One client of acme asks for more tokens than its in-flight cap allows: 429s (inflight_tokens) that
  // take no capacity from anyone.
  async function oversized(key) {
    while (!stopLoad && Date.now() < loadDeadline) {
      const r = await fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify({ model, max_tokens: 4000, messages: [{ role: "user", content: "a long essay, please" }] }),
      });
      counts.acme[`oversized ${r.status}`] = (counts.acme[`oversized ${r.status}`] || 0) + 1;
      await r.arrayBuffer();
      await sleep(150);
    }
  }
  const loops = [];
  // Ten clients each against four backend slots: deep queues, so both stay backlogged even when a busy
  // machine slows the clients down (with shallow ones a slow client leaves its slot to the other tenant).
  for (let n = 0; n < 10; n += 1) loops.push(loop("acme", third, n), loop("beta", betaKey, n));
  loops.push(oversized(third));
  step("load started");

  await page.evaluate(() => (location.hash = "#/tenants/acme/live"));
  await page.waitForURL(/#\/tenants\/acme\/live$/);
  await page.locator('[data-chart="requests"]').waitFor();
  const firstSeen = await chartState("requests");
  await page.waitForFunction(() => Number(document.querySelector('[data-tile="requests"]').dataset.value || 0) > 0, null, { timeout: 30000 });
  await page.waitForFunction(
    () =>
      ["requests", "tokens", "share", "wait", "limited", "cache", "spend"].every((name) => {
        const el = document.querySelector(`[data-chart="${name}"]`);
        return el && Number(el.dataset.points) >= 3;
      }) &&
      Number(document.querySelector('[data-tile="limited"]').dataset.value || 0) > 0 &&
      Number(document.querySelector('[data-tile="cache"]').dataset.value || 0) > 0 &&
      Number(document.querySelector('[data-tile="spend"]').dataset.value || 0) > 0,
    null,
    { timeout: 40000 },
  );
  const live1 = {
    requests: await tileValue("requests"),
    tokens: await tileValue("tokens"),
    share: await tileValue("share"),
    wait: await tileValue("wait"),
    limited: await tileValue("limited"),
    cache: await tileValue("cache"),
    spend: await tileValue("spend"),
    charts: {},
  };
  for (const name of ["requests", "tokens", "share", "wait", "limited", "cache", "spend"]) live1.charts[name] = await chartState(name);
  live1.limitedSeries = (await page.locator('[data-chart="limited"]').getAttribute("data-series")).split("|");
  live1.limitedWords = await page.locator('[data-chart="limited"] .chart-latest').textContent();
  live1.cutLabels = await cutTimeLabels();
  await sleep(4500);
  const live2 = { spend: await tileValue("spend"), charts: { requests: await chartState("requests"), tokens: await chartState("tokens") } };
  seen.live = { firstSeen, live1, live2 };
  a11y.live = await unlabelled();
  await shot("06-live");
  await shot("06-live-full", true);
  step("live view moved");

  await page.getByRole("link", { name: "Fairness" }).click();
  await page.getByRole("heading", { name: "Fairness", level: 1 }).waitFor();
  await page.waitForFunction(
    () => ["acme", "beta"].every((t) => document.querySelector(`tr[data-tenant="${t}"] [data-share]`)?.dataset.share) &&
      Number(document.querySelector('[data-chart="fairness"]')?.dataset.points || 0) >= 3,
    null,
    { timeout: 30000 },
  );
  // Let the window fill with contended intervals before reading the shares.
  await sleep(6500);
  seen.fairness = await page.evaluate(() => ({
    shares: Object.fromEntries([...document.querySelectorAll("tr[data-tenant]")].map((r) => [r.dataset.tenant, Number(r.querySelector("[data-share]").dataset.share)])),
    jain: Number(document.querySelector('[data-tile="jain"]').dataset.value),
    jainState: document.querySelector('[data-tile="jain"]').dataset.state,
    chart: { points: Number(document.querySelector('[data-chart="fairness"]').dataset.points), series: document.querySelectorAll('[data-chart="fairness"] .latest-item').length },
  }));
  a11y.fairness = await unlabelled();
  await shot("07-fairness");
  step("fairness seen");

  // The pool's two engines under the load: each one's limit against the permits held there, and what
  // the engine itself reports.
  await page.getByRole("link", { name: "Backends" }).click();
  await page.getByRole("heading", { name: "Backends", level: 1 }).waitFor();
  await page.waitForFunction(
    () => {
      const rows = [...document.querySelectorAll('[data-backend="sim"] tr[data-endpoint]')];
      return (
        rows.length === 2 &&
        rows.every((r) => Number(r.dataset.limit) > 0 && Number(r.dataset.permits) > 0 && Number(r.querySelector("[data-rate]").dataset.rate) > 0) &&
        Number(document.querySelector('[data-chart="pool-sim"]')?.dataset.points || 0) >= 3
      );
    },
    null,
    { timeout: 30000 },
  );
  seen.backends = await page.evaluate(() => ({
    endpoints: [...document.querySelectorAll('[data-backend="sim"] tr[data-endpoint]')].map((r) => ({
      id: r.dataset.endpoint,
      limit: Number(r.dataset.limit),
      permits: Number(r.dataset.permits),
      running: r.dataset.running,
      waiting: r.dataset.waiting,
      state: r.dataset.state,
      rate: Number(r.querySelector("[data-rate]").dataset.rate),
      hit: r.querySelector("[data-hit]").dataset.hit,
      cells: [...r.children].map((c) => c.textContent),
    })),
    summary: document.querySelector('[data-backend="sim"] .pool-summary').textContent,
    warningHidden: document.querySelector('[data-backend="sim"] .pool-warning').hidden,
    scopeHidden: document.querySelector(".scope").hidden,
    chart: { points: Number(document.querySelector('[data-chart="pool-sim"]').dataset.points), series: document.querySelector('[data-chart="pool-sim"]').dataset.series },
  }));
  a11y.backends = await unlabelled();
  await shot("07c-backends");
  await shot("07c-backends-full", true);
  step("backends seen");

  // Clients that bypass the gateway, straight to the busy engine (one request at a time): requests wait
  // inside it, where the gateway cannot order them, and the page warns once they keep waiting.
  let stopDirect = false;
  async function direct() {
    while (!stopDirect && Date.now() < loadDeadline) {
      try {
        const r = await fetch(`${config.busyUrl}/v1/chat/completions`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ model, max_tokens: 200, messages: [{ role: "user", content: "elsewhere" }] }),
        });
        await r.arrayBuffer();
      } catch {
        await sleep(100);
      }
    }
  }
  const directLoops = Array.from({ length: 6 }, () => direct());
  await page.locator('[data-backend="busy"] tr[data-state="queueing"]').waitFor({ timeout: 60000 });
  seen.engineQueue = await page.evaluate(() => ({
    rows: [...document.querySelectorAll('tr[data-state="queueing"]')].map((r) => ({ id: r.dataset.endpoint, state: r.dataset.state, badge: r.querySelector(".badge")?.textContent })),
    waiting: document.querySelector('[data-backend="busy"] tr[data-endpoint]').dataset.waiting,
    warning: document.querySelector('[data-backend="busy"] .pool-warning:not([hidden])')?.textContent || "",
    simWarningHidden: document.querySelector('[data-backend="sim"] .pool-warning').hidden,
  }));
  await page.locator('[data-backend="busy"]').scrollIntoViewIfNeeded();
  await shot("07e-backends-engine-queue");
  stopDirect = true;
  await Promise.all(directLoops);
  step("engine queue seen");

  // Several processes publishing their figures (as replicas sharing Redis do): both pages say that
  // their figures are across all of them. The gateway's answer gains a second process here.
  const twoProcesses = async (route) => {
    const response = await route.fetch();
    const body = await response.json();
    body.replicas = [...body.replicas, { id: "replica-b", started_at: body.time - 60, time: body.time }];
    await route.fulfill({ response, json: body });
  };
  await page.route("**/admin/stats", twoProcesses);
  await page.locator(".scope:not([hidden])").waitFor();
  seen.backendsScope = await page.locator(".scope").textContent();
  await page.getByRole("link", { name: "Fairness" }).click();
  await page.getByRole("heading", { name: "Fairness", level: 1 }).waitFor();
  await page.locator(".scope:not([hidden])").waitFor();
  seen.fairnessScope = await page.locator(".scope").textContent();
  // The set of processes changed (a reset): the shares come back after two polls.
  await page.locator('tr[data-tenant="acme"] [data-share]').waitFor();
  await shot("07d-fairness-across-processes");
  // Wait for a poll in flight to be answered, then the gateway's answers pass unchanged again.
  await page.unrouteAll({ behavior: "wait" });
  step("scope seen");

  // beta has no limits: its 429 chart draws nothing and says so.
  await page.evaluate(() => (location.hash = "#/tenants/beta/live"));
  await page.waitForFunction(() => Number(document.querySelector('[data-chart="limited"]')?.dataset.points || 0) >= 3, null, { timeout: 30000 });
  seen.betaLimited = await page.evaluate(() => {
    const card = document.querySelector('[data-chart="limited"]');
    const note = card.querySelector(".chart-empty");
    return { series: card.dataset.series, note: note && !note.hidden ? note.textContent : null, plotHidden: card.querySelector(".chart-plot").hidden };
  });
  await shot("07b-live-no-429s", true);
  step("beta live seen");

  await page.getByRole("link", { name: "Tenants", exact: true }).first().click();
  await page.getByRole("heading", { name: "Tenants", level: 1 }).waitFor();
  await page.waitForFunction(() => /\/s$/.test(document.querySelector('[data-rate="acme"]')?.textContent || ""), null, { timeout: 15000 });
  seen.tenantsRate = await page.locator('[data-rate="acme"]').textContent();
  a11y.tenants = await unlabelled();
  await shot("08-tenants");

  // Narrow window: the same pages must stay readable.
  await page.setViewportSize({ width: 420, height: 900 });
  await sleep(300);
  await shot("09-narrow-tenants", true);
  await page.goto(`${url}/console/#/tenants/acme/live`);
  await page.reload(); // the key was in memory only: a reload asks for it again, then opens the same page
  await page.getByRole("heading", { name: "Gateway console" }).waitFor();
  seen.reloadSignsOut = true;
  await page.locator("input[name=admin_key]").fill(adminKey);
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => Number(document.querySelector('[data-tile="requests"]')?.dataset.value || 0) > 0, null, { timeout: 30000 });
  await sleep(2500);
  await shot("10-narrow-live", true);
  seen.narrowOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  // The same chart module on a time axis that ends exactly on a labelled tick, and 1 and 2 s past one:
  // the last label sits at the plot's right edge, where it used to be cut.
  await page.evaluate(async () => {
    const { lineChart } = await import("/console/js/charts.js");
    const host = document.createElement("section");
    host.id = "axis-probe";
    host.className = "charts";
    document.querySelector("main").prepend(host);
    for (const end of [1800000000, 1800000001, 1800000002]) {
      const chart = lineChart({ id: `probe-${end}`, title: `Ending ${end % 5} s past a tick`, series: [{ label: "a", color: "#2f6bd8" }], format: String });
      host.append(chart.el);
      const xs = Array.from({ length: 12 }, (_, i) => end - 22 + 2 * i);
      chart.update(xs, [xs.map((_, i) => i)]);
    }
    await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  });
  await page.locator("#axis-probe").screenshot({ path: join(shots, "10a-narrow-time-axis.png") });
  seen.narrowCutLabels = await cutTimeLabels();
  seen.probeCharts = await page.locator("#axis-probe [data-chart]").count();
  await page.evaluate(() => document.getElementById("axis-probe").remove());
  await page.getByRole("link", { name: "Keys" }).click();
  await page.locator("tbody tr").first().waitFor();
  await shot("11-narrow-keys", true);
  seen.narrowKeysOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.getByRole("link", { name: "Backends" }).click();
  await page.locator('[data-backend="sim"] tr[data-endpoint]').first().waitFor();
  await sleep(500);
  await shot("11a-narrow-backends", true);
  seen.narrowBackendsOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.evaluate(() => (location.hash = "#/tenants/acme/keys"));
  await page.locator("tbody tr").first().waitFor();
  await page.setViewportSize({ width: 1280, height: 800 });

  stopLoad = true;
  await Promise.all(loops);
  seen.load = counts;
  step("load stopped");

  // --- edit the tenant: an invalid limit first, then a new weight ------------------------------------

  // Set through the API first: on_limit (the form does not show it) and a tpm limit the form does show.
  seen.beforeEdit = await adminCall("PATCH", "/admin/tenants/acme", { on_limit: { queue: "fallback" }, limits: { tpm: 900000 } });
  await page.getByRole("link", { name: "Settings" }).click();
  await page.getByRole("button", { name: "Save changes" }).waitFor();
  await page.getByLabel("Requests per minute").fill("1.5");
  await page.getByRole("button", { name: "Save changes" }).click();
  const rpmError = page.locator('[data-param="limits.rpm"] .field-error');
  await rpmError.waitFor({ state: "visible" });
  seen.rpmError = await rpmError.textContent();
  seen.rpmFocused = await page.evaluate(() => document.activeElement.name);
  a11y.settings = await unlabelled();
  await shot("12-settings-error");
  await page.getByLabel("Requests per minute").fill("6000");
  await page.getByLabel("Weight").fill("2");
  await page.getByLabel("In-flight tokens").fill("");
  await page.getByLabel("Prefix-cache scope").selectOption("group");
  await page.getByLabel("Group name").fill("research");
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.waitForURL(/#\/tenants\/acme\/live$/);
  await page.locator(".facts", { hasText: "Weight 2" }).waitFor();
  seen.factsAfterEdit = await page.locator(".facts").textContent();
  step("tenant edited");

  // --- the admin API reference, from the header (a new tab) ---------------------------------------------

  const [reference] = await Promise.all([context.waitForEvent("page"), page.getByRole("link", { name: /API reference/ }).click()]);
  reference.on("pageerror", (e) => seen.consoleErrors.push(`reference pageerror: ${e.message}`));
  reference.on("console", (m) => {
    if (m.type() === "error" || m.type() === "warning") seen.consoleErrors.push(`reference ${m.type()}: ${m.text()}`);
  });
  await reference.locator("#reference[data-operations]").waitFor({ timeout: 20000 });
  seen.reference = await reference.evaluate(() => ({
    operations: [...document.querySelectorAll("[data-operation]")].map((el) => el.dataset.operation),
    schemas: [...document.querySelectorAll("[data-schema]")].map((el) => el.dataset.schema),
    title: document.title,
    patchBody: document.querySelector('[data-operation="PATCH /admin/tenants/{tenant_id}"]')?.textContent || "",
    brokenLinks: [...document.querySelectorAll('a[href^="#"]')].filter((a) => a.getAttribute("href").length > 1 && !document.getElementById(a.getAttribute("href").slice(1))).map((a) => a.getAttribute("href")),
  }));
  await reference.screenshot({ path: join(shots, "13-api-reference.png") });
  await reference.locator('[data-schema="TenantPatch"]').scrollIntoViewIfNeeded();
  await reference.screenshot({ path: join(shots, "14-api-reference-schema.png") });
  const mainPage = page;
  page = reference; // unlabelled() reads the current page
  a11y.reference = await unlabelled();
  page = mainPage;
  await reference.close();
  step("reference read");

} catch (err) {
  // Leave a picture and what was seen so far, for whoever reads the failing test.
  seen.failure = `${err.message}`.slice(0, 2000);
  await shot("failure", true).catch(() => {});
}
seen.a11y = a11y;
stopLoad = true;
await context.close();
rmSync(profile, { recursive: true, force: true });
console.log(JSON.stringify(seen));
