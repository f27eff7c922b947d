// Right after a run of upstream faults, normal requests through the official `openai` npm package
// with its retries off: a whole answer, a stream and a tool call on each model of MODELS
// (comma-separated). Prints one JSON object, per model what each request got; tests/continuity.rs
// asserts on it.
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.OPENAI_BASE_URL,
  apiKey: process.env.OPENAI_API_KEY,
  maxRetries: 0,
});
const weather = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather of a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

const results = {};
for (const model of process.env.MODELS.split(",")) {
  const whole = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "whole from node" }],
  });
  let streamed = "";
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "stream from node" }],
    stream: true,
  });
  for await (const chunk of stream) {
    const content = chunk.choices[0]?.delta?.content;
    if (content) streamed += content;
  }
  const tool = await client.chat.completions.create({
    model,
    messages: [{ role: "user", content: "use get_weather" }],
    tools: [weather],
  });
  const calls = tool.choices[0].message.tool_calls ?? [];
  results[model] = {
    whole: whole.choices[0].message.content,
    stream: streamed,
    tool: calls.length > 0 ? calls[0].function.name : null,
  };
}
console.log(JSON.stringify(results));
