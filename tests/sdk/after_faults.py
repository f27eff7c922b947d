"""Right after a run of upstream faults, normal requests through the official `openai` SDK with its
retries off: a whole answer, a stream and a tool call on each model of MODELS (comma-separated).
Prints one JSON object, per model what each request got; tests/continuity.rs asserts on it.
"""

import json
import os

import openai

client = openai.OpenAI(
    base_url=os.environ["OPENAI_BASE_URL"],
    api_key=os.environ["OPENAI_API_KEY"],
    max_retries=0,
)
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

results = {}
for model in os.environ["MODELS"].split(","):
    whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "whole from python"}])
    streamed = ""
    for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "stream from python"}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            streamed += chunk.choices[0].delta.content
    tool = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "use get_weather"}], tools=[weather]
    )
    calls = tool.choices[0].message.tool_calls or []
    results[model] = {
        "whole": whole.choices[0].message.content,
        "stream": streamed,
        "tool": calls[0].function.name if calls else None,
    }

print(json.dumps(results))
