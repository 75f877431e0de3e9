// The tenants list: every tenant's policy at a glance, with its live request rate and share.

import { allTenants } from "../api.js";
import { h } from "../dom.js";
import * as fmt from "../format.js";
import * as poller from "../poller.js";
import { tenantPoint } from "../rates.js";

export async function tenantsView(main) {
  const body = h("tbody", {}, h("tr", {}, h("td", { colspan: 9, class: "empty" }, "Loading tenants…")));
  const table = h(
    "table",
    { class: "table", "aria-describedby": "tenants-caption" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { scope: "col" }, "Tenant"),
        h("th", { scope: "col", class: "num" }, "Weight"),
        h("th", { scope: "col", class: "num optional" }, "Priority"),
        h("th", { scope: "col", class: "optional" }, "Models"),
        h("th", { scope: "col", class: "optional" }, "Limits and budget"),
        h("th", { scope: "col", class: "optional" }, "Cache scope"),
        h("th", { scope: "col", class: "num" }, "Requests/s"),
        h("th", { scope: "col", class: "num optional" }, "Share / entitled"),
        h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")),
      ),
    ),
    body,
  );
  main.replaceChildren(
    h(
      "div",
      { class: "page-head" },
      h("div", {}, h("h1", { tabindex: "-1" }, "Tenants"), h("p", { class: "lede", id: "tenants-caption" }, "Teams sharing this gateway, their quotas and live traffic.")),
      h("a", { class: "button button-primary", href: "#/tenants/new" }, "New tenant"),
    ),
    h("div", { class: "card table-card" }, h("div", { class: "table-scroll" }, table)),
  );

  const tenants = await allTenants();
  const rates = new Map();
  if (!tenants.length) {
    body.replaceChildren(
      h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No tenants yet. ", h("a", { href: "#/tenants/new" }, "Create the first one"), ".")),
    );
  } else {
    body.replaceChildren(
      ...tenants.map((t) => {
        const rate = h("td", { class: "num", "data-rate": t.id }, fmt.NONE);
        const share = h("td", { class: "num optional", "data-share": t.id }, fmt.NONE);
        rates.set(t.id, [rate, share]);
        const href = `#/tenants/${encodeURIComponent(t.id)}`;
        return h(
          "tr",
          { "data-tenant": t.id },
          h(
            "th",
            { scope: "row" },
            h("a", { href, class: "tenant-link" }, t.id),
            t.name ? h("span", { class: "sub" }, t.name) : null,
            t.config_managed ? h("span", { class: "badge", title: "Declared in the config file; change it there." }, "config") : null,
          ),
          h("td", { class: "num" }, fmt.num(t.weight, 2)),
          h("td", { class: "num optional" }, String(t.priority)),
          h("td", { class: "optional mono" }, t.models.join(", ")),
          h("td", { class: "optional" }, fmt.limits(t.limits), h("span", { class: "sub" }, fmt.budget(t.budget))),
          h("td", { class: "optional mono" }, t.cache_scope),
          rate,
          share,
          h(
            "td",
            { class: "actions" },
            h("a", { href, class: "button button-small optional" }, "Live", h("span", { class: "visually-hidden" }, ` view of ${t.id}`)),
            h("a", { href: `${href}/keys`, class: "button button-small" }, "Keys", h("span", { class: "visually-hidden" }, ` of ${t.id}`)),
          ),
        );
      }),
    );
  }
  return poller.subscribe(({ intervals }) => {
    const iv = intervals[intervals.length - 1];
    for (const [id, [rate, share]] of rates) {
      const p = tenantPoint(iv, id);
      rate.textContent = p ? fmt.rate(p.requests) : fmt.NONE;
      share.textContent = p && p.active && p.share !== null ? `${fmt.pct(p.share)} / ${fmt.pct(p.entitled)}` : fmt.NONE;
    }
  });
}
