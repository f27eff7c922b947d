// Streams one chat through the gateway with the official `openai` npm package while an Anthropic
// channel answers. Prints one JSON object; tests/openai_sdk.rs asserts on it.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: process.env.OPENAI_API_KEY });
const stream = await client.chat.completions.create({
  model: "test-model",
  messages: [{ role: "user", content: "hello from node" }],
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let finish = null;
let usageTotal = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  if (choice?.delta?.content) text += choice.delta.content;
  if (choice?.finish_reason) finish = choice.finish_reason;
  if (chunk.usage) usageTotal = chunk.usage.total_tokens;
}
console.log(JSON.stringify({ stream: text, finish, usage_total: usageTotal }));
