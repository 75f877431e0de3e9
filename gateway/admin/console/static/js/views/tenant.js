// One tenant's page: a header with its policy and three tabs (live view, keys, settings) as links, so
// each has its own address and the browser's back button works.

import { api, ApiError, path } from "../api.js";
import { h } from "../dom.js";
import * as fmt from "../format.js";
import { keysView } from "./keys.js";
import { liveView } from "./live.js";
import { tenantForm } from "./tenant-form.js";

const TABS = [
  ["live", "Live"],
  ["keys", "Keys"],
  ["settings", "Settings"],
];

export async function tenantView(main, id, tab) {
  let tenant;
  try {
    tenant = await api("GET", path.tenant(id));
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {
      main.replaceChildren(
        h("h1", { tabindex: "-1" }, "No such tenant"),
        h("p", {}, `There is no tenant ${id}. `, h("a", { href: "#/tenants" }, "Back to the tenants"), "."),
      );
      return null;
    }
    throw err;
  }
  const base = `#/tenants/${encodeURIComponent(tenant.id)}`;
  const content = h("div", { class: "tab-panel", id: "tab-panel" });
  main.replaceChildren(
    h("nav", { "aria-label": "Breadcrumb", class: "breadcrumb" }, h("a", { href: "#/tenants" }, "Tenants"), h("span", { "aria-hidden": "true" }, " / "), tenant.id),
    h(
      "div",
      { class: "page-head" },
      h(
        "div",
        {},
        h("h1", { tabindex: "-1" }, tenant.name ? `${tenant.name}` : tenant.id, tenant.name ? h("span", { class: "h1-sub mono" }, tenant.id) : null),
        h(
          "p",
          { class: "facts" },
          h("span", {}, `Weight ${fmt.num(tenant.weight, 2)}`),
          h("span", {}, `Priority ${tenant.priority}`),
          h("span", {}, fmt.limits(tenant.limits)),
          h("span", {}, fmt.budget(tenant.budget)),
          h("span", { class: "mono" }, `cache: ${tenant.cache_scope}`),
          tenant.config_managed ? h("span", { class: "badge" }, "config-managed") : null,
        ),
      ),
    ),
    h(
      "nav",
      { class: "tabs", "aria-label": "Tenant sections" },
      TABS.map(([name, label]) => h("a", { href: `${base}/${name}`, "aria-current": name === tab ? "page" : null, class: "tab" }, label)),
    ),
    content,
  );
  if (tab === "keys") {
    await keysView(content, tenant);
    return null;
  }
  if (tab === "settings") {
    tenantForm(content, tenant, { onSaved: (saved) => (location.hash = `#/tenants/${encodeURIComponent(saved.id)}/live`) });
    return null;
  }
  return liveView(content, tenant);
}
