// A tenant's virtual keys: create (the secret is shown once), disable, rotate with a grace period, revoke.

import { api, path } from "../api.js";
import { confirmDialog, secretDialog } from "../dialogs.js";
import { h, toast } from "../dom.js";
import { clearErrors, field, formError, showError } from "../forms.js";
import * as fmt from "../format.js";

const GRACE = [
  ["0", "None: the old key stops at once"],
  ["300", "5 minutes"],
  ["3600", "1 hour"],
  ["86400", "1 day"],
  ["604800", "7 days"],
];

function status(k, now) {
  if (k.revoked) return ["revoked", "Revoked"];
  if (k.expires_at !== null && k.expires_at <= now) return ["expired", "Expired"];
  if (k.disabled) return ["disabled", "Disabled"];
  if (k.expires_at !== null) return ["expiring", `Active until ${fmt.when(k.expires_at)}`];
  return ["active", "Active"];
}

export async function keysView(host, tenant) {
  const list = h("div", { class: "card table-card" });
  const heading = h("h2", { class: "section-title", tabindex: "-1" }, "Keys");
  const name = field({ label: "Key name", name: "name", hint: "What uses it, e.g. ci or the service's name.", attrs: { autocomplete: "off" } });
  const expires = field({ label: "Expires", name: "expires_at", type: "datetime-local", hint: "Optional; local time." });
  const submit = h("button", { type: "submit", class: "button button-primary" }, "Create key");
  const form = h(
    "form",
    { class: "card form form-inline", novalidate: true, "aria-labelledby": "new-key-title" },
    h("h2", { id: "new-key-title" }, "New key"),
    formError(),
    h("div", { class: "inline-fields" }, name, expires, h("div", { class: "field field-submit" }, submit)),
  );

  async function reload() {
    const keys = await api("GET", path.keys(tenant.id));
    render(keys);
    // The button that had focus may be gone with the old rows: keep keyboard users in this section.
    if (document.activeElement === document.body) heading.focus();
  }

  function render(keys) {
    const now = Date.now() / 1000;
    if (!keys.length) {
      list.replaceChildren(h("p", { class: "empty" }, "This tenant has no keys yet."));
      return;
    }
    const rows = keys
      .slice()
      .sort((a, b) => b.created_at - a.created_at)
      .map((k) => {
        const [state, label] = status(k, now);
        const live = state === "active" || state === "expiring" || state === "disabled";
        const keyName = k.name || k.id;
        return h(
          "tr",
          { "data-key": k.id, "data-state": state },
          h("th", { scope: "row" }, keyName, h("span", { class: "sub mono" }, k.id)),
          h("td", { class: "mono optional" }, k.prefix.endsWith("…") ? k.prefix : `${k.prefix}…`),
          h("td", { class: "optional" }, fmt.when(k.created_at)),
          h("td", {}, h("span", { class: `pill pill-${state}` }, label)),
          h(
            "td",
            { class: "actions" },
            live && !k.config_managed ? actionButton("Rotate", keyName, () => rotate(k)) : null,
            live && !k.config_managed ? actionButton(k.disabled ? "Enable" : "Disable", keyName, () => toggle(k)) : null,
            live && !k.config_managed ? actionButton("Revoke", keyName, () => revoke(k), "button-danger-quiet") : null,
            k.config_managed ? h("span", { class: "badge" }, "config") : null,
          ),
        );
      });
    list.replaceChildren(
      h(
        "div",
        { class: "table-scroll" },
        h(
          "table",
          { class: "table", "aria-label": `Keys of ${tenant.id}` },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Name"),
              h("th", { scope: "col", class: "optional" }, "Prefix"),
              h("th", { scope: "col", class: "optional" }, "Created"),
              h("th", { scope: "col" }, "Status"),
              h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")),
            ),
          ),
          h("tbody", {}, rows),
        ),
      ),
    );
  }

  async function rotate(k) {
    const grace = field({ label: "The old key keeps working for", name: "grace", type: "select", value: "3600", options: GRACE });
    const answer = await confirmDialog({
      title: `Rotate ${k.name || k.id}?`,
      body: [h("p", {}, "A new secret replaces this key; applications switch to it while the old one still works."), grace],
      confirm: "Rotate key",
    });
    if (!answer) return;
    try {
      const created = await api("POST", `${path.key(k.id)}/rotate`, { grace_period_s: Number(answer.grace) });
      await secretDialog({ title: "Key rotated", secret: created.key, keyInfo: created.name || created.id });
      await reload();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  async function toggle(k) {
    try {
      await api("PATCH", path.key(k.id), { disabled: !k.disabled });
      toast(`${k.name || k.id} ${k.disabled ? "enabled" : "disabled"}.`, "success");
      await reload();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  async function revoke(k) {
    const ok = await confirmDialog({
      title: `Revoke ${k.name || k.id}?`,
      body: h("p", {}, "Requests with this key are refused from now on, on every replica within a second. This cannot be undone."),
      confirm: "Revoke key",
      danger: true,
    });
    if (!ok) return;
    try {
      await api("POST", `${path.key(k.id)}/revoke`);
      toast(`Revoked ${k.name || k.id}.`, "success");
      await reload();
    } catch (err) {
      toast(err.message, "error");
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { name: name.control.value.trim() || null };
    if (expires.control.value) {
      const at = new Date(expires.control.value).getTime();
      if (!Number.isFinite(at)) {
        showError(form, { param: "expires_at", message: "Enter a date and time." });
        return;
      }
      body.expires_at = at / 1000;
    }
    submit.disabled = true;
    try {
      const created = await api("POST", path.keys(tenant.id), body);
      name.control.value = "";
      expires.control.value = "";
      await secretDialog({ title: "Key created", secret: created.key, keyInfo: created.name || created.id });
      await reload();
    } catch (err) {
      showError(form, err);
    } finally {
      submit.disabled = false;
    }
  });

  host.replaceChildren(form, heading, list);
  list.replaceChildren(h("p", { class: "empty" }, "Loading keys…"));
  await reload();
}

function actionButton(label, keyName, onclick, extra = "") {
  return h(
    "button",
    { type: "button", class: `button button-small ${extra}`.trim(), onclick, "data-action": label.toLowerCase() },
    label,
    h("span", { class: "visually-hidden" }, ` ${keyName}`),
  );
}
