"""Drives the gateway with the official `openai` SDK while a channel of another protocol answers
(Anthropic, Gemini): a translated stream, a streamed tool call assembled by the SDK's stream
helper, JSON mode parsed into a Pydantic model and, with WITH_EMBEDDINGS=1, embeddings in the
SDK's default (base64) and float encodings. Prints one JSON object; tests/openai_sdk.rs asserts on it.
"""

import json
import os

import openai
import pydantic

client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])

text = ""
usage_total = None
finish = None
with client.chat.completions.create(
    model="test-model",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "stream through translation"}],
    stream=True,
    stream_options={"include_usage": True},
) as stream:
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            usage_total = chunk.usage.total_tokens

weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
with client.chat.completions.stream(
    model="test-model",
    messages=[{"role": "user", "content": "explain, then use get_weather"}],
    tools=[weather],
) as tool_stream:
    for _event in tool_stream:
        pass
    tool_completion = tool_stream.get_final_completion()
tool_message = tool_completion.choices[0].message


class Person(pydantic.BaseModel):
    name: str
    age: int


parsed = client.chat.completions.parse(
    model="test-model",
    messages=[{"role": "user", "content": "a person please"}],
    response_format=Person,
)
person = parsed.choices[0].message.parsed

embeddings = None
if os.environ.get("WITH_EMBEDDINGS") == "1":
    default = client.embeddings.create(model="test-embedding", input=["alpha beta", "gamma"])
    floats = client.embeddings.create(model="test-embedding", input="alpha beta", encoding_format="float")
    embeddings = {
        "count": len(default.data),
        "indexes": [item.index for item in default.data],
        "same_vector": [round(x, 5) for x in default.data[0].embedding] == [round(x, 5) for x in floats.data[0].embedding],
        "dimensions": len(floats.data[0].embedding),
        "prompt_tokens": default.usage.prompt_tokens,
    }

print(
    json.dumps(
        {
            "embeddings": embeddings,
            "stream": text,
            "stream_finish": finish,
            "stream_usage_total": usage_total,
            "tool_text": tool_message.content,
            "tool_name": tool_message.tool_calls[0].function.name,
            "tool_arguments": json.loads(tool_message.tool_calls[0].function.arguments),
            "tool_finish": tool_completion.choices[0].finish_reason,
            "person": person.model_dump() if person else None,
        }
    )
)
