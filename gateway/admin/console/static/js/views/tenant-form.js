// Creating and editing a tenant: weight, priority, models, limits, budget and cache scope. Creating
// POSTs what the form shows; editing PATCHes only what changed, as a JSON merge patch (a cleared field is
// sent as null, which the API sets back to its default), so a field the form does not show (on_limit)
// or one that someone else changed meanwhile is never overwritten. The API validates either.

import { api, path } from "../api.js";
import { h, toast } from "../dom.js";
import { confirmDialog } from "../dialogs.js";
import { clearErrors, field, formError, numberValue, showError } from "../forms.js";
import { mergePatch } from "../patch.js";

const LIMITS = [
  ["rpm", "Requests per minute", "Token bucket; empty for no limit."],
  ["tpm", "Tokens per minute", "Prompt + completion tokens."],
  ["max_concurrency", "Concurrent requests", "Requests in flight at once."],
  ["max_inflight_tokens", "In-flight tokens", "Prompt + max_tokens of the requests in flight."],
  ["max_queue_wait_ms", "Maximum queue wait (ms)", "Longer waits answer 429."],
  ["max_queue_depth", "Maximum queue depth", "Requests waiting for a backend slot."],
];

const SCOPES = [
  ["tenant", "Tenant: its own prefix cache (default)"],
  ["key", "Key: each key its own prefix cache"],
  ["group", "Group: shared with cooperating tenants"],
  ["global", "Global: no salt (trusted tier)"],
];

/** The form for `tenant` (null: a new tenant). Resolves when rendered. */
export function tenantForm(host, tenant, { onSaved }) {
  const editing = tenant !== null;
  const t = tenant || { weight: 1, priority: 0, models: ["*"], limits: {}, budget: null, cache_scope: "tenant", allow_client_salt: false, user_field: "passthrough" };
  const scope = t.cache_scope.startsWith("group:") ? "group" : t.cache_scope;

  const f = {
    id: editing ? null : field({ label: "Tenant id", name: "id", hint: "Lower-case letters, digits, - and _; it cannot change later.", attrs: { autocomplete: "off", spellcheck: "false" } }),
    name: field({ label: "Display name", name: "name", value: t.name || "", hint: "Optional." }),
    weight: field({ label: "Weight", name: "weight", type: "number", value: t.weight, hint: "Share of capacity when backends are saturated.", attrs: { step: "any", inputmode: "decimal" } }),
    priority: field({ label: "Priority", name: "priority", type: "number", value: t.priority, hint: "Higher bands are served first (-100 to 100).", attrs: { step: "1", inputmode: "numeric" } }),
    models: field({ label: "Allowed models", name: "models", value: t.models.join(", "), hint: "Comma-separated names; wildcards such as llama-*; * for every model.", attrs: { spellcheck: "false" } }),
    budgetAmount: field({ label: "Budget amount", name: "budget_amount", param: "budget.amount", type: "number", value: t.budget ? t.budget.amount : "", hint: "Spend allowed per period; empty for no budget.", attrs: { step: "any", inputmode: "decimal" } }),
    budgetPeriod: field({ label: "Budget period", name: "budget_period", param: "budget.period", type: "select", value: t.budget ? t.budget.period : "month", options: [["day", "Day"], ["week", "Week"], ["month", "Month"]] }),
    scope: field({ label: "Prefix-cache scope", name: "cache_scope", type: "select", value: scope, options: SCOPES }),
    group: field({ label: "Group name", name: "cache_group", value: scope === "group" ? t.cache_scope.slice(6) : "", hint: "Tenants in the same group share a prefix cache.", attrs: { spellcheck: "false" } }),
    clientSalt: field({ label: "Let clients split the tenant's cache scope with their own cache_salt", name: "allow_client_salt", type: "checkbox", value: t.allow_client_salt }),
    userField: field({ label: "The OpenAI user field", name: "user_field", type: "select", value: t.user_field, options: [["passthrough", "Forward as sent"], ["tenant", "Replace with the tenant id"], ["strip", "Remove"]] }),
  };
  const limits = LIMITS.map(([name, label, hint]) =>
    field({ label, name, param: `limits.${name}`, type: "number", value: t.limits[name] ?? "", hint, attrs: { step: "1", min: "0", inputmode: "numeric" } }),
  );
  const syncGroup = () => {
    f.group.hidden = f.scope.control.value !== "group";
  };
  f.scope.control.addEventListener("change", syncGroup);
  syncGroup();

  const managed = editing && t.config_managed;
  const submit = h("button", { type: "submit", class: "button button-primary", disabled: managed }, editing ? "Save changes" : "Create tenant");
  const cancelHref = editing ? `#/tenants/${encodeURIComponent(t.id)}` : "#/tenants";
  const fields = h(
    "fieldset",
    { class: "plain", disabled: managed },
    h("section", { class: "form-section" }, h("h2", {}, "Identity"), h("div", { class: "grid-2" }, f.id, f.name)),
    h("section", { class: "form-section" }, h("h2", {}, "Share and access"), h("div", { class: "grid-3" }, f.weight, f.priority, f.models)),
    h("section", { class: "form-section" }, h("h2", {}, "Limits"), h("div", { class: "grid-3" }, ...limits)),
    h("section", { class: "form-section" }, h("h2", {}, "Budget"), h("div", { class: "grid-3" }, f.budgetAmount, f.budgetPeriod)),
    h("section", { class: "form-section" }, h("h2", {}, "Prefix cache"), h("div", { class: "grid-2" }, f.scope, f.group)),
    h("details", { class: "form-section" }, h("summary", {}, "Advanced"), h("div", { class: "grid-2" }, f.userField, f.clientSalt)),
  );
  const form = h(
    "form",
    { class: "card form", novalidate: true, "aria-label": editing ? `Settings of ${t.id}` : "New tenant" },
    managed ? h("p", { class: "notice" }, "This tenant is declared in the config file: change it there and reload the gateway.") : null,
    formError(),
    fields,
    h("div", { class: "form-actions" }, h("a", { class: "button button-quiet", href: cancelHref }, "Cancel"), submit),
  );

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const numbers = [
      ["weight", f.weight],
      ["priority", f.priority],
      ...LIMITS.map(([name], i) => [`limits.${name}`, limits[i]]),
      ["budget.amount", f.budgetAmount],
    ];
    const values = {};
    for (const [param, wrapper] of numbers) {
      const v = numberValue(wrapper);
      if (v && v.bad) {
        showError(form, { param, message: "Enter a number." });
        return;
      }
      values[param] = v;
    }
    const chosen = f.scope.control.value;
    const shown = {
      name: f.name.control.value.trim() || null,
      weight: values.weight,
      priority: values.priority,
      models: f.models.control.value.split(/[\s,]+/).filter(Boolean),
      limits: Object.fromEntries(LIMITS.map(([name]) => [name, values[`limits.${name}`]])),
      budget: values["budget.amount"] === null ? null : { amount: values["budget.amount"], period: f.budgetPeriod.control.value },
      cache_scope: chosen === "group" ? `group:${f.group.control.value.trim()}` : chosen,
      allow_client_salt: f.clientSalt.control.checked,
      user_field: f.userField.control.value,
    };
    let body;
    if (editing) {
      body = mergePatch(t, shown);
      if (Object.keys(body).length === 0) {
        toast("Nothing to save: no field changed.");
        return;
      }
    } else {
      // Empty fields are left out, so the API's defaults apply.
      body = { id: f.id.control.value.trim() };
      for (const [name, value] of Object.entries(shown)) if (value !== null) body[name] = value;
      body.limits = Object.fromEntries(Object.entries(shown.limits).filter(([, v]) => v !== null));
    }
    submit.disabled = true;
    try {
      const saved = editing ? await api("PATCH", path.tenant(t.id), body) : await api("POST", "/admin/tenants", body);
      toast(editing ? `Saved ${saved.id}.` : `Created tenant ${saved.id}.`, "success");
      onSaved(saved);
    } catch (err) {
      // A bad group name is about the group field, not the scope menu.
      const param = err.param === "cache_scope" && chosen === "group" ? "cache_group" : err.param;
      showError(form, { message: err.message, param });
    } finally {
      submit.disabled = false;
    }
  });

  host.replaceChildren(form);
  if (editing && !managed) host.append(dangerZone(t));
  if (!managed) (editing ? f.name : f.id).control.focus();
}

function dangerZone(t) {
  const button = h("button", { type: "button", class: "button button-danger" }, `Delete ${t.id}`);
  button.addEventListener("click", async () => {
    const ok = await confirmDialog({
      title: `Delete tenant ${t.id}?`,
      body: h("p", {}, "The tenant and all its keys are deleted; requests with its keys fail at once. Usage already recorded stays."),
      confirm: "Delete tenant",
      danger: true,
    });
    if (!ok) return;
    try {
      await api("DELETE", path.tenant(t.id));
      toast(`Deleted ${t.id}.`, "success");
      location.hash = "#/tenants";
    } catch (err) {
      toast(err.message, "error");
    }
  });
  return h(
    "section",
    { class: "card danger-zone", "aria-labelledby": "danger-title" },
    h("h2", { id: "danger-title" }, "Delete this tenant"),
    h("p", {}, "Deleting removes the tenant and revokes every key it has."),
    button,
  );
}
