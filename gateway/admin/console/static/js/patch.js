// The JSON merge patch (RFC 7396) that turns what was loaded into what a form shows: the admin API's
// PATCH takes one. Pure (no DOM), so tests/browser/patch.test.mjs checks it under Node.

/**
 * Only the fields of `after` that differ from `before`; objects compared member by member; null where a
 * field was cleared. Fields of `before` that `after` does not mention are left out: unchanged.
 */
export function mergePatch(before, after) {
  const patch = {};
  for (const [name, value] of Object.entries(after)) {
    const old = before[name] ?? null;
    if (isObject(value) && isObject(old)) {
      const inner = mergePatch(old, value);
      if (Object.keys(inner).length) patch[name] = inner;
    } else if (JSON.stringify(value) !== JSON.stringify(old)) {
      patch[name] = value;
    }
  }
  return patch;
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}
