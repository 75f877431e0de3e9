// The admin API reference (api.html), rendered from the gateway's own /openapi.json: its operations by
// resource, each with its parameters, body and answers, and every schema with its fields and limits.
// Built from text nodes only; `code` in descriptions becomes <code> elements, never markup.

import { h } from "./dom.js";

const METHODS = ["get", "post", "put", "patch", "delete"];

/** Text with `code` spans as <code> elements. */
function prose(text) {
  if (!text) return [];
  return text.split(/(`[^`]+`)/g).map((part) => (part.length > 2 && part.startsWith("`") && part.endsWith("`") ? h("code", {}, part.slice(1, -1)) : part));
}

function refName(ref) {
  return ref.split("/").pop();
}

const schemaId = (name) => `schema-${name}`;

/** A schema's type in words, with links to named schemas. */
function typeOf(schema) {
  if (!schema) return ["any"];
  if (schema.$ref) return [h("a", { href: `#${schemaId(refName(schema.$ref))}` }, refName(schema.$ref))];
  if (schema.anyOf || schema.oneOf) return join((schema.anyOf || schema.oneOf).map(typeOf), " | ");
  if (schema.enum) return [`one of ${schema.enum.map((v) => JSON.stringify(v)).join(", ")}`];
  if (schema.const !== undefined) return [JSON.stringify(schema.const)];
  if (schema.type === "array") return ["array of ", ...typeOf(schema.items)];
  if (schema.type === "object" && schema.additionalProperties && typeof schema.additionalProperties === "object") {
    return ["object of ", ...typeOf(schema.additionalProperties)];
  }
  const type = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "any";
  return [schema.format ? `${type} (${schema.format})` : type];
}

function join(parts, sep) {
  return parts.flatMap((p, i) => (i ? [sep, ...p] : p));
}

/** Limits a schema puts on a value, in words: ranges, lengths, patterns, defaults. */
function limitsOf(schema) {
  const out = [];
  const walk = (s) => {
    if (!s) return;
    if (s.anyOf) s.anyOf.forEach(walk);
    if (s.minimum !== undefined) out.push(`≥ ${s.minimum}`);
    if (s.exclusiveMinimum !== undefined) out.push(`> ${s.exclusiveMinimum}`);
    if (s.maximum !== undefined) out.push(`≤ ${s.maximum}`);
    if (s.exclusiveMaximum !== undefined) out.push(`< ${s.exclusiveMaximum}`);
    if (s.minLength !== undefined) out.push(`length ≥ ${s.minLength}`);
    if (s.maxLength !== undefined) out.push(`length ≤ ${s.maxLength}`);
    if (s.pattern !== undefined) out.push(h("code", {}, s.pattern));
    if (s.items) {
      const before = out.length;
      walk(s.items);
      if (out.length > before) out[before] = ["each item ", out[before]];
    }
  };
  walk(schema);
  if (schema && schema.default !== undefined) out.push(["default ", h("code", {}, JSON.stringify(schema.default))]);
  return join(
    out.map((x) => [x]),
    ", ",
  );
}

function fieldsTable(schema, caption) {
  const props = Object.entries(schema.properties || {});
  if (!props.length) return null;
  const required = new Set(schema.required || []);
  return h(
    "div",
    { class: "table-scroll" },
    h(
      "table",
      { class: "table ref-table" },
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", {}, h("tr", {}, ["Field", "Type", "Required", "Limits", "Description"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        props.map(([name, s]) =>
          h(
            "tr",
            {},
            h("th", { scope: "row", class: "mono" }, name),
            h("td", {}, typeOf(s)),
            h("td", {}, required.has(name) ? "yes" : "no"),
            h("td", {}, limitsOf(s)),
            h("td", {}, prose(s.description || "")),
          ),
        ),
      ),
    ),
  );
}

function operationSection(path, method, op) {
  const id = `op-${op.operationId || `${method}-${path}`}`;
  const params = op.parameters || [];
  const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  return h(
    "section",
    { class: "card ref-op", id, "data-operation": `${method.toUpperCase()} ${path}`, "aria-labelledby": `${id}-title` },
    h("h3", { id: `${id}-title`, class: "ref-op-title" }, h("span", { class: `ref-method ref-${method}` }, method.toUpperCase()), " ", h("span", { class: "mono" }, path)),
    op.summary ? h("p", { class: "ref-summary" }, op.summary) : null,
    op.description ? h("p", {}, prose(op.description)) : null,
    params.length
      ? [
          h("h4", {}, "Parameters"),
          h(
            "div",
            { class: "table-scroll" },
            h(
              "table",
              { class: "table ref-table" },
              h("caption", { class: "visually-hidden" }, `Parameters of ${method.toUpperCase()} ${path}`),
              h("thead", {}, h("tr", {}, ["Name", "In", "Type", "Required", "Limits", "Description"].map((c) => h("th", { scope: "col" }, c)))),
              h(
                "tbody",
                {},
                params.map((p) =>
                  h(
                    "tr",
                    {},
                    h("th", { scope: "row", class: "mono" }, p.name),
                    h("td", {}, p.in),
                    h("td", {}, typeOf(p.schema)),
                    h("td", {}, p.required ? "yes" : "no"),
                    h("td", {}, limitsOf(p.schema)),
                    h("td", {}, prose(p.description || (p.schema && p.schema.description) || "")),
                  ),
                ),
              ),
            ),
          ),
        ]
      : null,
    body ? [h("h4", {}, "Request body"), h("p", {}, typeOf(body.schema), op.requestBody.required ? "" : " (optional)")] : null,
    h("h4", {}, "Answers"),
    h(
      "ul",
      { class: "ref-answers" },
      Object.entries(op.responses || {}).map(([status, r]) => {
        const content = r.content && (r.content["application/json"] || Object.values(r.content)[0]);
        return h("li", {}, h("strong", { class: "mono" }, status), " ", prose(r.description || ""), content && content.schema ? [": ", typeOf(content.schema)] : null);
      }),
    ),
  );
}

function schemaSection(name, schema) {
  return h(
    "section",
    { class: "card ref-schema", id: schemaId(name), "data-schema": name, "aria-labelledby": `${schemaId(name)}-title` },
    h("h3", { id: `${schemaId(name)}-title`, class: "mono" }, name),
    schema.description ? h("p", {}, prose(schema.description)) : null,
    schema.additionalProperties === false ? h("p", { class: "hint" }, "Other fields are refused (422).") : null,
    fieldsTable(schema, `Fields of ${name}`) || h("p", {}, typeOf(schema)),
  );
}

function render(doc, host) {
  const byTag = new Map();
  for (const [path, ops] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) {
      const op = ops[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  const schemas = Object.entries((doc.components && doc.components.schemas) || {});
  const schemes = Object.values((doc.components && doc.components.securitySchemes) || {});
  const toc = h(
    "nav",
    { class: "card ref-toc", "aria-label": "Operations" },
    h("h2", {}, "Operations"),
    [...byTag.entries()].map(([tag, ops]) =>
      h(
        "div",
        { class: "ref-toc-group" },
        h("h3", {}, h("a", { href: `#tag-${tag}` }, tag)),
        h(
          "ul",
          {},
          ops.map(([path, method, op]) => h("li", {}, h("a", { href: `#op-${op.operationId || `${method}-${path}`}`, class: "mono" }, `${method.toUpperCase()} ${path}`))),
        ),
      ),
    ),
    h("h3", {}, h("a", { href: "#schemas" }, "Schemas")),
  );
  host.replaceChildren(
    h(
      "section",
      { class: "card ref-intro", "aria-label": "About this API" },
      h("p", {}, h("strong", {}, doc.info.title), ` (version ${doc.info.version}). `, prose(doc.info.description || "")),
      schemes.length ? h("p", {}, "Authentication: ", schemes.map((s) => prose(s.description || `${s.type} ${s.scheme || ""}`))) : null,
      h("p", {}, "Every error has OpenAI's shape, ", h("code", {}, '{"error": {"message", "type", "param", "code"}}'), "; on a 422, ", h("code", {}, "param"), " names the field."),
    ),
    toc,
    ...[...byTag.entries()].map(([tag, ops]) =>
      h("section", { class: "ref-group", id: `tag-${tag}`, "aria-labelledby": `tag-${tag}-title` }, h("h2", { id: `tag-${tag}-title`, class: "ref-group-title" }, tag), ops.map(([path, method, op]) => operationSection(path, method, op))),
    ),
    h("section", { class: "ref-group", id: "schemas", "aria-labelledby": "schemas-title" }, h("h2", { id: "schemas-title", class: "ref-group-title" }, "Schemas"), schemas.map(([name, s]) => schemaSection(name, s))),
  );
  host.dataset.operations = String([...byTag.values()].reduce((n, ops) => n + ops.length, 0));
  host.dataset.schemas = String(schemas.length);
  host.removeAttribute("aria-busy");
  // A link to an operation (api.html#op-...) works once the page is drawn.
  if (location.hash.length > 1) document.getElementById(decodeURIComponent(location.hash.slice(1)))?.scrollIntoView();
}

async function main() {
  const host = document.getElementById("reference");
  try {
    const response = await fetch("/openapi.json", { credentials: "omit", cache: "no-store", redirect: "error" });
    if (!response.ok) throw new Error(`the gateway answered ${response.status}`);
    render(await response.json(), host);
  } catch (err) {
    host.replaceChildren(h("p", { class: "form-error", role: "alert" }, `Could not read /openapi.json: ${err.message}`));
    host.removeAttribute("aria-busy");
  }
}

main();
