// Form fields with a real <label>, an optional hint, and a slot for the API's error about that field.
// The admin API is the one validator: a 422 (or 409) names the field in `error.param`, and the message
// is shown under the field it concerns, with aria-invalid and aria-describedby pointing at it.

import { h, uid } from "./dom.js";

/**
 * field({label, name, param, type, value, hint, options, attrs}) -> the wrapper element.
 * `param` is the API's name for the field (e.g. "limits.rpm"); it defaults to `name`.
 */
export function field({ label, name, param = name, type = "text", value = "", hint = null, options = null, attrs = {} }) {
  const id = uid("field");
  const hintId = hint ? `${id}-hint` : null;
  const errorId = `${id}-error`;
  let control;
  if (type === "select") {
    control = h(
      "select",
      { id, name, "aria-describedby": hintId, ...attrs },
      options.map(([v, text]) => h("option", { value: v, selected: String(v) === String(value) }, text)),
    );
  } else if (type === "checkbox") {
    control = h("input", { id, name, type, checked: Boolean(value), "aria-describedby": hintId, ...attrs });
  } else if (type === "textarea") {
    control = h("textarea", { id, name, rows: 2, "aria-describedby": hintId, ...attrs });
    control.value = value ?? "";
  } else {
    control = h("input", { id, name, type, value: value ?? "", "aria-describedby": hintId, ...attrs });
  }
  const wrapper = h(
    "div",
    { class: `field field-${type}`, "data-param": param },
    type === "checkbox" ? null : h("label", { for: id }, label),
    type === "checkbox" ? h("div", { class: "check" }, control, h("label", { for: id }, label)) : control,
    hint ? h("p", { class: "hint", id: hintId }, hint) : null,
    h("p", { class: "field-error", id: errorId, hidden: true }),
  );
  wrapper.control = control;
  return wrapper;
}

export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) {
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    const ids = (el.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && !x.endsWith("-error"));
    if (ids.length) el.setAttribute("aria-describedby", ids.join(" "));
    else el.removeAttribute("aria-describedby");
  }
  const summary = form.querySelector(".form-error");
  if (summary) {
    summary.hidden = true;
    summary.textContent = "";
  }
}

/** The field an API param names: exact, then without list indexes, then its top-level name. */
function fieldFor(form, param) {
  if (!param) return null;
  const candidates = [param, param.replace(/\[\d+\]/g, ""), param.split(/[.[]/)[0]];
  for (const name of candidates) {
    const found = form.querySelector(`[data-param="${CSS.escape(name)}"]`);
    if (found) return found;
  }
  return null;
}

/** Show an API error next to its field (or at the top of the form) and move focus there. */
export function showError(form, error) {
  const wrapper = fieldFor(form, error.param);
  let message = error.message || "Something went wrong.";
  // The API's messages start with the field's path ("limits.rpm: ..."): next to the field it is noise.
  if (error.param) message = message.replace(/^[A-Za-z_][\w.[\]]*: /, "");
  message = message.charAt(0).toUpperCase() + message.slice(1);
  if (wrapper && wrapper.control) {
    const slot = wrapper.querySelector(".field-error");
    slot.textContent = message;
    slot.hidden = false;
    const control = wrapper.control;
    control.setAttribute("aria-invalid", "true");
    const described = new Set((control.getAttribute("aria-describedby") || "").split(" ").filter(Boolean));
    described.add(slot.id);
    control.setAttribute("aria-describedby", [...described].join(" "));
    // Open a collapsed section the field sits in, so focus lands on something visible.
    const details = wrapper.closest("details");
    if (details) details.open = true;
    control.focus({ preventScroll: true });
    // Centred, so the sticky header never covers the field and its message.
    control.scrollIntoView({ block: "center" });
    return;
  }
  const summary = form.querySelector(".form-error");
  summary.textContent = message;
  summary.hidden = false;
  summary.focus();
}

/** The form-level error slot (role=alert, so it is announced). */
export function formError() {
  return h("p", { class: "form-error", role: "alert", tabindex: "-1", hidden: true });
}

/** A number field's value: null when empty; an error object when the browser could not parse it. */
export function numberValue(wrapper) {
  const control = wrapper.control;
  if (control.validity && control.validity.badInput) return { bad: true };
  if (control.value.trim() === "") return null;
  return Number(control.value);
}
