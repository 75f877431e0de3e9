// The console's entry point: signing in and out, the hash router, and the header's live status.
// Views render into <main> and may return a cleanup function (charts, subscriptions) run on leaving.

import { onSignOut, signedIn, signOut } from "./api.js";
import { h, toast } from "./dom.js";
import * as poller from "./poller.js";
import { backendsView } from "./views/backends.js";
import { fairnessView } from "./views/fairness.js";
import { loginView } from "./views/login.js";
import { tenantForm } from "./views/tenant-form.js";
import { tenantView } from "./views/tenant.js";
import { tenantsView } from "./views/tenants.js";

const main = document.getElementById("main");
const topbar = document.getElementById("topbar");
const status = document.getElementById("live-status");

const ROUTES = [
  [/^#\/tenants\/new$/, () => newTenant(), "New tenant", "tenants"],
  [/^#\/tenants\/([a-z0-9][a-z0-9_-]{0,62})(?:\/(live|keys|settings))?$/, (m) => tenantView(main, m[1], m[2] || "live"), (m) => m[1], "tenants"],
  [/^#\/fairness$/, () => fairnessView(main), "Fairness", "fairness"],
  [/^#\/backends$/, () => backendsView(main), "Backends", "backends"],
  [/^#\/tenants$/, () => tenantsView(main), "Tenants", "tenants"],
];

let cleanup = null;
let rendering = 0;

function newTenant() {
  main.replaceChildren(
    h("nav", { "aria-label": "Breadcrumb", class: "breadcrumb" }, h("a", { href: "#/tenants" }, "Tenants"), h("span", { "aria-hidden": "true" }, " / "), "New"),
    h("div", { class: "page-head" }, h("div", {}, h("h1", { tabindex: "-1" }, "New tenant"), h("p", { class: "lede" }, "A team that shares the gateway: its weight, limits, budget and prefix-cache scope."))),
  );
  const host = h("div", {});
  main.append(host);
  tenantForm(host, null, { onSaved: (t) => (location.hash = `#/tenants/${encodeURIComponent(t.id)}/keys`) });
}

async function route() {
  if (typeof cleanup === "function") cleanup();
  cleanup = null;
  if (!signedIn()) return;
  const hash = location.hash || "#/tenants";
  let found = null;
  for (const [pattern, view, title, nav] of ROUTES) {
    const m = hash.match(pattern);
    if (m) {
      found = { view, m, title: typeof title === "function" ? title(m) : title, nav };
      break;
    }
  }
  if (!found) {
    location.replace("#/tenants");
    return;
  }
  document.title = `${found.title} · Gateway console`;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === found.nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const mine = (rendering += 1);
  // Where focus was when the route began (the link followed, or nothing): the new page's heading takes
  // focus only from there, never from wherever the operator has moved it since.
  const before = document.activeElement;
  const previous = main.querySelector("h1");
  const focusHeading = () => {
    const heading = main.querySelector("h1");
    const at = document.activeElement;
    if (!heading || heading === previous) return; // the new page has not drawn its heading yet
    if (at === before || at === document.body || at === null || !at.isConnected) heading.focus();
  };
  main.setAttribute("aria-busy", "true");
  try {
    const pending = found.view(found.m);
    // A view draws its heading before it waits for data: focus it now, so keyboard and screen-reader
    // users start at the top of the page at once (and a Tab pressed meanwhile is not undone later).
    focusHeading();
    const result = await pending;
    if (mine !== rendering) {
      if (typeof result === "function") result(); // the operator moved on meanwhile
      return;
    }
    cleanup = result;
  } catch (err) {
    if (!signedIn()) return;
    main.replaceChildren(h("h1", { tabindex: "-1" }, "Something went wrong"), h("p", { class: "form-error", role: "alert" }, err.message));
  } finally {
    main.removeAttribute("aria-busy");
  }
  // A view that drew its heading only after loading (or replaced it) gets focus moved to it now, unless
  // the view put focus on a field or the operator moved it.
  focusHeading();
}

function showLogin(reason = null) {
  topbar.hidden = true;
  poller.stop();
  document.title = "Sign in · Gateway console";
  loginView(main, {
    reason,
    onSignedIn: () => {
      topbar.hidden = false;
      poller.start();
      route();
    },
  });
}

onSignOut((reason) => {
  if (typeof cleanup === "function") cleanup();
  cleanup = null;
  for (const dialog of document.querySelectorAll("dialog")) dialog.close();
  showLogin(reason);
});

poller.subscribe(({ latest, error }) => {
  if (error) {
    status.textContent = `Live data paused: ${error.message}`;
    status.dataset.state = "error";
  } else if (latest) {
    const n = latest.replicas.length;
    status.textContent = `Live · ${n} gateway process${n === 1 ? "" : "es"}${latest.complete ? "" : " (some unreadable)"}`;
    status.dataset.state = latest.complete ? "ok" : "partial";
  }
});

document.getElementById("sign-out").addEventListener("click", () => {
  signOut(null);
  toast("Signed out.");
});

// The skip link targets <main> without changing the route in the hash.
document.getElementById("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

window.addEventListener("hashchange", route);
showLogin();
