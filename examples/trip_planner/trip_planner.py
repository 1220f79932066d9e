"""A small application that calls the OpenAI API: the code under test in this example.

Its client reads OPENAI_BASE_URL from the environment: seedcache's pytest plugin sets it as pytest
starts (pytest.ini has seedcache settings), before this module is imported.
"""

from __future__ import annotations

import json
from typing import Any

from openai import OpenAI

MODEL = "gpt-4o-mini"
SEED = 42

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def client() -> OpenAI:
    return OpenAI(max_retries=0)


def suggest_trip(interest: str) -> str:
    """One sentence suggesting a destination for someone who likes `interest`."""
    completion = client().chat.completions.create(
        model=MODEL,
        seed=SEED,
        temperature=0,
        messages=[
            {"role": "system", "content": "You are a travel agent. Answer in one sentence."},
            {"role": "user", "content": f"Where should someone who loves {interest} travel?"},
        ],
    )
    return completion.choices[0].message.content or ""


def stream_packing_list(destination: str) -> list[str]:
    """A packing list for `destination`, streamed; returns the text pieces as they arrived."""
    stream = client().chat.completions.create(
        model=MODEL,
        seed=SEED,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"What should I pack for {destination}?"}],
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces


def weather_question(question: str) -> dict[str, Any]:
    """Ask the model which city's weather a question is about, through a tool call."""
    completion = client().chat.completions.create(
        model=MODEL,
        seed=SEED,
        temperature=0,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": question}],
    )
    call = completion.choices[0].message.tool_calls[0]  # type: ignore[index]
    arguments: dict[str, Any] = json.loads(call.function.arguments)  # type: ignore[union-attr]
    return {"tool": call.function.name, "arguments": arguments}  # type: ignore[union-attr]
