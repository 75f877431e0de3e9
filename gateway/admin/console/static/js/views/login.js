// Sign in with the admin key. The key is checked with one admin API call and then kept in memory only.

import { api, ApiError, signIn } from "../api.js";
import { h } from "../dom.js";
import { clearErrors, field, formError, showError } from "../forms.js";

export function loginView(main, { reason, onSignedIn }) {
  const key = field({
    label: "Admin key",
    name: "admin_key",
    param: "admin_key",
    type: "password",
    hint: "The gateway's GATEWAY_ADMIN_KEY. It stays in this tab's memory: reloading the page signs you out.",
    attrs: { autocomplete: "off", spellcheck: "false", required: true },
  });
  const submit = h("button", { type: "submit", class: "button button-primary button-wide" }, "Sign in");
  const form = h(
    "form",
    { class: "login-form", novalidate: true, "aria-labelledby": "login-title" },
    formError(),
    key,
    submit,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const value = key.control.value.trim();
    if (!value) {
      showError(form, { param: "admin_key", message: "Enter the admin key." });
      return;
    }
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      await api("GET", "/admin/tenants?limit=1", undefined, { key: value });
      signIn(value);
      key.control.value = "";
      onSignedIn();
    } catch (err) {
      const message =
        err instanceof ApiError && err.status === 401
          ? "This key is not the admin key."
          : err instanceof ApiError && err.status === 403
            ? "This is a tenant's virtual key; the console needs the admin key."
            : err.message;
      showError(form, { param: "admin_key", message });
    } finally {
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  });
  main.replaceChildren(
    h(
      "section",
      { class: "login card", "aria-labelledby": "login-title" },
      h("div", { class: "login-brand" }, h("img", { src: "favicon.svg", alt: "", width: 40, height: 40 })),
      h("h1", { id: "login-title", tabindex: "-1" }, "Gateway console"),
      h("p", { class: "lede" }, "Tenants, keys, quotas and live usage of this gateway."),
      reason ? h("p", { class: "notice", role: "alert" }, reason) : null,
      form,
      h("p", { class: "hint login-more" }, "Scripting it instead? The ", h("a", { href: "api.html" }, "admin API reference"), " needs no key."),
    ),
  );
  key.control.focus();
}
