// Building the page from data: elements are made with text nodes only (never innerHTML), so a tenant
// name or an API message can never become markup.

/**
 * h("button", {class: "button", onclick: fn, "aria-label": "..."}, "text", child, ...)
 * Attributes whose value is null, undefined or false are left out; `true` sets an empty attribute.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "value" && "value" in el) {
      el.value = value;
    } else if (name === "checked") {
      el.checked = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  clear(el);
  append(el, children);
  return el;
}

let ids = 0;
/** A fresh id for label/for and aria-describedby pairs. */
export function uid(prefix = "f") {
  ids += 1;
  return `${prefix}-${ids}`;
}

const toastHost = () => document.getElementById("toasts");

/** A short status message in the polite live region (announced, then gone). */
export function toast(message, kind = "info") {
  const host = toastHost();
  const item = h("div", { class: `toast toast-${kind}` }, message);
  host.append(item);
  setTimeout(() => item.remove(), 6000);
}
