// An unmodified app using the official OpenAI npm SDK with its defaults
// (https://api.openai.com/v1). It trusts the node CA only through
// NODE_EXTRA_CA_CERTS. Prints one JSON line with what it received.
import OpenAI from "openai";

const client = new OpenAI({ apiKey: "sk-test-node-openai", maxRetries: 0, timeout: 20000 });
const messages = [{ role: "user", content: "Say hello" }];
const r = await client.chat.completions.create({ model: "gpt-4o-mini", messages });
let text = "";
let usage = null;
const stream = await client.chat.completions.create({
  model: "gpt-4o-mini", messages, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) usage = chunk.usage.prompt_tokens;
}
console.log(JSON.stringify({
  content: r.choices[0].message.content,
  prompt_tokens: r.usage.prompt_tokens,
  stream_text: text,
  stream_prompt_tokens: usage,
}));
