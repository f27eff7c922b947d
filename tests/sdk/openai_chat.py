"""Drives the gateway with the official `openai` SDK: only base URL and key change.

Prints one JSON object with what it saw; tests/openai_sdk.rs asserts on it.
"""

import json
import os

import openai

client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])

chat = client.chat.completions.create(
    model="test-model",
    messages=[{"role": "user", "content": "hello from the sdk"}],
)

text = ""
stream_usage_total = None
with client.chat.completions.create(
    model="test-model",
    messages=[{"role": "user", "content": "stream please"}],
    stream=True,
    stream_options={"include_usage": True},
) as stream:
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            stream_usage_total = chunk.usage.total_tokens

error_status = None
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
except openai.NotFoundError as error:
    error_status = error.status_code

print(
    json.dumps(
        {
            "chat": chat.choices[0].message.content,
            "chat_model": chat.model,
            "chat_usage_total": chat.usage.total_tokens,
            "stream": text,
            "stream_usage_total": stream_usage_total,
            "error_status": error_status,
        }
    )
)
