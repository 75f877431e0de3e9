// Modal dialogs on the native <dialog>: focus moves in and is kept there, Escape cancels, and focus
// returns to what opened it. Each dialog is removed from the page when it closes.

import { h, toast } from "./dom.js";

function open(dialog) {
  const opener = document.activeElement;
  document.body.append(dialog);
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (opener && opener.isConnected) opener.focus();
  });
  dialog.showModal();
  return dialog;
}

/**
 * Ask before a change; resolves to the form's values (an object) when confirmed, null when cancelled.
 * `body` may hold fields (inputs with a name) whose values come back.
 */
export function confirmDialog({ title, body, confirm, danger = false }) {
  return new Promise((resolve) => {
    let result = null;
    const titleId = `dlg-${Math.random().toString(36).slice(2)}`;
    const form = h(
      "form",
      { method: "dialog", class: "dialog-form" },
      h("h2", { id: titleId }, title),
      body,
      h(
        "div",
        { class: "dialog-actions" },
        h("button", { type: "button", class: "button button-quiet", value: "cancel", onclick: () => dialog.close() }, "Cancel"),
        h("button", { type: "submit", class: danger ? "button button-danger" : "button button-primary", value: "ok" }, confirm),
      ),
    );
    const dialog = h("dialog", { class: "dialog", "aria-labelledby": titleId }, form);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      result = Object.fromEntries(new FormData(form).entries());
      dialog.close();
    });
    dialog.addEventListener("close", () => resolve(result));
    open(dialog);
    // Start on the safe choice for destructive actions, on the first field otherwise.
    const first = form.querySelector("input, select") || form.querySelector(danger ? "button[value=cancel]" : "button[type=submit]");
    first.focus();
  });
}

/** Show a new key's secret once, with a copy button. The secret leaves the page when the dialog closes. */
export function secretDialog({ title, secret, keyInfo }) {
  return new Promise((resolve) => {
    const titleId = "secret-title";
    const input = h("input", {
      id: "secret-value",
      class: "secret",
      type: "text",
      readonly: true,
      value: secret,
      spellcheck: "false",
      autocomplete: "off",
      "aria-describedby": "secret-note",
    });
    const status = h("span", { class: "copy-status", role: "status", "aria-live": "polite" });
    const copy = h(
      "button",
      {
        type: "button",
        class: "button button-primary",
        id: "copy-secret",
        onclick: async () => {
          const ok = await copyText(input);
          status.textContent = ok ? "Copied to the clipboard." : "Copy failed: select the key and copy it by hand.";
        },
      },
      "Copy key",
    );
    const done = h("button", { type: "button", class: "button", id: "secret-done", onclick: () => dialog.close() }, "Done");
    const dialog = h(
      "dialog",
      { class: "dialog dialog-secret", "aria-labelledby": titleId, "data-dialog": "secret" },
      h("h2", { id: titleId }, title),
      h("p", { id: "secret-note", class: "warning" }, "This is the only time the secret is shown: the gateway keeps only its hash. Copy it now and store it somewhere safe."),
      h("div", { class: "field" }, h("label", { for: "secret-value" }, `Secret of ${keyInfo}`), h("div", { class: "secret-row" }, input, copy)),
      status,
      h("div", { class: "dialog-actions" }, done),
    );
    dialog.addEventListener("close", () => {
      input.value = "";
      resolve();
    });
    open(dialog);
    input.focus();
    input.select();
  });
}

async function copyText(input) {
  try {
    await navigator.clipboard.writeText(input.value);
    return true;
  } catch {
    // Without the async clipboard (permission refused): the selection and the older command.
    input.select();
    try {
      return document.execCommand("copy");
    } catch {
      return false;
    }
  }
}

export { toast };
