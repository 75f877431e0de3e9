// The official openai Node SDK against the gateway: chat, streaming, error classes, retries.
// Usage: node compat.mjs <base_url> <key> <rpm_limited_key>; prints one JSON line of findings.
import OpenAI from "openai";

const [baseURL, apiKey, limitedKey] = process.argv.slice(2);
const out = {};
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });

const done = await client.chat.completions.create({
  model: "chat-model",
  messages: [{ role: "user", content: "hello from node" }],
  max_tokens: 3,
});
out.chat = done.choices[0].message.content;
out.usage = done.usage.completion_tokens;

const stream = await client.chat.completions.create({
  model: "chat-model",
  messages: [{ role: "user", content: "stream from node" }],
  max_tokens: 5,
  stream: true,
});
let text = "";
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  text += chunk.choices[0]?.delta?.content ?? "";
}
out.stream_chunks = chunks;
out.stream_text = text;

try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
} catch (err) {
  out.not_found = err instanceof OpenAI.NotFoundError;
  out.not_found_code = err.code;
}
try {
  await new OpenAI({ baseURL, apiKey: "sk-gw-" + "x".repeat(43), maxRetries: 0 }).models.list();
} catch (err) {
  out.auth_error = err instanceof OpenAI.AuthenticationError;
}

// A rate-limited key: the SDK retries the 429 after the advertised delay and succeeds.
const limited = new OpenAI({ baseURL, apiKey: limitedKey, maxRetries: 3 });
const start = Date.now();
let first429 = null;
const rawFetch = globalThis.fetch;
const retrying = new OpenAI({
  baseURL,
  apiKey: limitedKey,
  maxRetries: 3,
  fetch: async (url, init) => {
    const resp = await rawFetch(url, init);
    if (resp.status === 429 && first429 === null) first429 = Number(resp.headers.get("retry-after-ms"));
    return resp;
  },
});
void limited;
const retried = await retrying.chat.completions.create({
  model: "chat-model",
  messages: [{ role: "user", content: "x" }],
  max_tokens: 1,
});
out.retried_ok = retried.choices.length === 1;
out.first_429_retry_after_ms = first429;
out.retry_elapsed_ms = Date.now() - start;

console.log(JSON.stringify(out));
