// An app calling the official OpenAI npm SDK the way most apps do: stream
// without stream_options, reading choices[0] of every chunk (a usage-only
// chunk, with no choices, would throw here). Prints what it parsed and the
// raw stream of a second, identical call.
import OpenAI from "openai";

const client = new OpenAI({ apiKey: "sk-test-node-default", maxRetries: 0, timeout: 20000 });
const req = { model: "gpt-4o-mini", messages: [{ role: "user", content: "Say hello" }], stream: true };
let text = "";
let chunks = 0;
for await (const chunk of await client.chat.completions.create(req)) {
  text += chunk.choices[0].delta.content ?? "";
  chunks += 1;
  if (chunk.usage) throw new Error(`a chunk carried usage the app did not ask for: ${JSON.stringify(chunk)}`);
}
const raw = await (await client.chat.completions.create(req).asResponse()).text();
console.log(JSON.stringify({ text, chunks, raw }));
