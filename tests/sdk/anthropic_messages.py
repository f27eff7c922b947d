"""Drives the gateway's Anthropic-native endpoint with the official `anthropic` SDK, changing only
base URL and key: a plain message, a system prompt, a streamed tool-use turn and its follow-up with
the tool result, count_tokens, and each error class. With CHANNEL=anthropic also extended thinking
passed back on the next turn and a `cache_control` block with an `anthropic-beta` header. Prints one
JSON object; tests/messages_endpoint.rs asserts on it.
"""

import json
import os

import anthropic

base_url = os.environ["ANTHROPIC_BASE_URL"]
client = anthropic.Anthropic(base_url=base_url, api_key=os.environ["ANTHROPIC_API_KEY"], max_retries=0)
out = {}

plain = client.messages.create(
    model="test-model", max_tokens=200, messages=[{"role": "user", "content": "hello plain"}]
)
out["plain"] = {
    "id": plain.id,
    "text": plain.content[0].text,
    "stop_reason": plain.stop_reason,
    "input_tokens": plain.usage.input_tokens,
    "output_tokens": plain.usage.output_tokens,
    "request_id": plain._request_id,
}

system = client.messages.create(
    model="test-model",
    max_tokens=200,
    system="Be brief.",
    messages=[{"role": "user", "content": "with a system prompt"}],
)
out["system"] = {"text": system.content[0].text, "input_tokens": system.usage.input_tokens}

tools = [
    {
        "name": "get_weather",
        "description": "Current weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
question = {"role": "user", "content": "What does get_weather say for Paris?"}
events = []
with client.messages.stream(model="test-model", max_tokens=200, tools=tools, messages=[question]) as stream:
    for event in stream:
        events.append(event.type)
        if event.type == "content_block_delta":
            events.append(event.delta.type)
    final = stream.get_final_message()
tool_use = next(block for block in final.content if block.type == "tool_use")
out["tool_turn"] = {
    "events": events,
    "stop_reason": final.stop_reason,
    "name": tool_use.name,
    "input": tool_use.input,
    "output_tokens": final.usage.output_tokens,
}

follow = client.messages.create(
    model="test-model",
    max_tokens=200,
    tools=tools,
    messages=[
        question,
        {"role": "assistant", "content": final.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "18 degrees"}]},
    ],
)
out["follow_up"] = {"text": follow.content[0].text, "stop_reason": follow.stop_reason}

count = client.messages.count_tokens(
    model="test-model", system="Be brief.", messages=[{"role": "user", "content": "count these four words"}]
)
out["count_tokens"] = count.input_tokens

if os.environ.get("CHANNEL") == "anthropic":
    thought = client.messages.create(
        model="test-model",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "think first"}],
    )
    thinking = next(block for block in thought.content if block.type == "thinking")
    again = client.messages.create(
        model="test-model",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": "think first"},
            {"role": "assistant", "content": thought.content},
            {"role": "user", "content": "and again"},
        ],
    )
    out["thinking"] = {
        "signature": thinking.signature,
        "next_turn": [block.type for block in again.content],
    }
    cached = client.messages.create(
        model="test-model",
        max_tokens=200,
        system=[
            {
                "type": "text",
                "text": "A long and stable system prompt worth caching across turns.",
                "cache_control": {"type": "ephemeral"},
            }
        ],
        messages=[{"role": "user", "content": "use the cache"}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    out["cached"] = {
        "cache_creation_input_tokens": cached.usage.cache_creation_input_tokens,
        "input_tokens": cached.usage.input_tokens,
    }

errors = {}


def expect(name, call):
    try:
        call()
        errors[name] = None
    except anthropic.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        errors[name] = {
            "status": error.status_code,
            "class": type(error).__name__,
            "type": body.get("type"),
            "error_type": (body.get("error") or {}).get("type"),
            "request_id": error.request_id,
        }


def ask(key=None, model="test-model", content="hello", messages=None):
    caller = anthropic.Anthropic(base_url=base_url, api_key=key or os.environ["ANTHROPIC_API_KEY"], max_retries=0)
    return caller.messages.create(
        model=model, max_tokens=100, messages=messages if messages is not None else [{"role": "user", "content": content}]
    )


expect("authentication", lambda: ask(key="tg-not-a-key"))
expect("permission", lambda: ask(key=os.environ["REFUSED_KEY"]))
expect("not_found", lambda: ask(model="no-such-model"))
expect("invalid_request", lambda: ask(messages=[]))
expect("request_too_large", lambda: ask(content="x" * (int(os.environ["MAX_BODY_BYTES"]) + 16 * 1024)))
expect("rate_limit_first", lambda: ask(key=os.environ["LIMITED_KEY"]))
expect("rate_limit", lambda: ask(key=os.environ["LIMITED_KEY"]))
expect("overloaded", lambda: ask(model="busy-model"))
out["errors"] = errors

print(json.dumps(out))
