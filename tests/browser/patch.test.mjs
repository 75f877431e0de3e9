// The console's merge patches (gateway/admin/console/static/js/patch.js) under Node's test runner: the
// tenant form sends only what changed, so a field it does not show is never sent.

import assert from "node:assert/strict";
import { test } from "node:test";

import { mergePatch } from "../../gateway/admin/console/static/js/patch.js";

const tenant = {
  id: "acme",
  weight: 3,
  models: ["llama-*", "gpt-4o"],
  limits: { rpm: 600, tpm: 100000, max_concurrency: 4 },
  budget: { amount: 50, period: "day" },
  on_limit: { queue: "fallback" },
};

test("nothing changed, nothing sent", () => {
  assert.deepEqual(mergePatch(tenant, { weight: 3, models: ["llama-*", "gpt-4o"], limits: { rpm: 600, tpm: 100000 } }), {});
});

test("one member of an object: only that member", () => {
  assert.deepEqual(mergePatch(tenant, { limits: { rpm: 60, tpm: 100000, max_concurrency: 4 } }), { limits: { rpm: 60 } });
  assert.deepEqual(mergePatch(tenant, { budget: { amount: 50, period: "week" } }), { budget: { period: "week" } });
});

test("a cleared field is null; a list is sent whole", () => {
  assert.deepEqual(mergePatch(tenant, { limits: { tpm: null }, budget: null }), { limits: { tpm: null }, budget: null });
  assert.deepEqual(mergePatch(tenant, { models: ["llama-*"] }), { models: ["llama-*"] });
});

test("an object that was absent is sent whole; fields the form does not show are never sent", () => {
  const bare = { id: "b", budget: null, limits: {} };
  assert.deepEqual(mergePatch(bare, { budget: { amount: 5, period: "month" }, limits: { rpm: null } }), { budget: { amount: 5, period: "month" } });
  assert.equal("on_limit" in mergePatch(tenant, { weight: 2 }), false);
});
