"""Divergence verdicts (DESIGN §7) as a labelled table of pairs, plus the measures behind them."""

from __future__ import annotations

import base64
import collections
import difflib
import json
import math
import random
import re
import struct
from typing import Any

import pytest

from proxy import divergence
from proxy.divergence import (
    ABSENT,
    VOLATILE,
    Comparison,
    Difference,
    Similarity,
    Verdict,
    compare,
    cosine_distance,
    is_divergence,
    json_paths_diff,
    ngram_cosine_distance,
    output_text,
    short,
)
from proxy.keys import BOOKKEEPING

OMIT: Any = object()  # an override that removes the member


def token_usage(completion_tokens: int = 7, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": 14,
        "completion_tokens": completion_tokens,
        "total_tokens": 14 + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def tool_call(
    name: str = "get_weather", arguments: str = '{"city":"Paris"}', id: str = "call_abc123"
) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _apply(body: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for name, value in overrides.items():
        if value is OMIT:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def chat(
    content: str | None = "The capital of France is Paris.",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
    usage: Any = None,
    fingerprint: Any = "fp_fc9f1d7035",
    n: int = 1,
    message: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A `chat.completion` as OpenAI returns it; `message` adds members to every message."""
    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    _apply(msg, message or {})
    if finish_reason is None:
        finish_reason = "tool_calls" if tool_calls else "stop"
    body: dict[str, Any] = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": i, "message": dict(msg), "logprobs": None, "finish_reason": finish_reason}
            for i in range(n)
        ],
        "usage": token_usage() if usage is None else usage,
        "service_tier": "default",
        "system_fingerprint": fingerprint,
    }
    return {k: v for k, v in _apply(body, overrides).items() if v is not OMIT}


def completion(text: str = "\n\nThis is indeed a test", **overrides: Any) -> dict[str, Any]:
    """A legacy `text_completion`."""
    body = {
        "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
        "object": "text_completion",
        "created": 1589478378,
        "model": "gpt-3.5-turbo-instruct",
        "system_fingerprint": None,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    return _apply(body, overrides)


def response(
    text: str = "Hello! How can I help you today?",
    *,
    output: list[dict[str, Any]] | None = None,
    item_id: str = "msg_67ccd3acc8d48190a77525dc6de64b4f",
    **overrides: Any,
) -> dict[str, Any]:
    """A Responses API `response` object."""
    message = {
        "type": "message",
        "id": item_id,
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    body = {
        "id": "resp_67ccd3a9da748190baa7f1570fe91ac6",
        "object": "response",
        "created_at": 1741476777,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "model": "gpt-4o-2024-08-06",
        "output": [message] if output is None else output,
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "metadata": {},
        "store": True,
        "usage": {"input_tokens": 10, "output_tokens": 9, "total_tokens": 19},
    }
    return _apply(body, overrides)


def function_call_item(
    name: str = "get_weather", arguments: str = '{"city":"Paris"}', id: str = "fc_1"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": id,
        "call_id": f"call_{id}",
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


def reasoning_item(summary: str, id: str = "rs_1") -> dict[str, Any]:
    return {"type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": summary}]}


def audio(transcript: str = "Paris.") -> dict[str, Any]:
    return {"id": "audio_1", "data": "UklGRg==", "expires_at": 1741573883, "transcript": transcript}


def embeddings(*vectors: Any) -> dict[str, Any]:
    """An embeddings `list`; vectors are float lists or base64 strings."""
    vectors = vectors or ([0.1, 0.2, 0.3],)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }


def b64(*floats: float) -> str:
    return base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode()


def token_logprobs(tokens: list[str], jitter: float = 0.0) -> list[dict[str, Any]]:
    """Logprob entries as chat and Responses give them; `jitter` moves every value."""
    return [
        {
            "token": t,
            "logprob": -0.5 - jitter,
            "bytes": list(t.encode()),
            "top_logprobs": [
                {"token": t, "logprob": -0.5 - jitter, "bytes": list(t.encode())},
                {"token": "x", "logprob": -1.5 + jitter, "bytes": [120]},
            ],
        }
        for t in tokens
    ]


def logprobs(tokens: list[str], jitter: float = 0.0) -> dict[str, Any]:
    return {"content": token_logprobs(tokens, jitter), "refusal": None}


def legacy_logprobs(tokens: list[str], jitter: float = 0.0) -> dict[str, Any]:
    """A legacy completion's parallel lists; with jitter, the top alternatives swap places."""
    values = [-0.5 - jitter for _ in tokens]
    top = [{t: -0.5, "x": -1.5} if not jitter else {"x": -0.6, t: -0.5 - jitter} for t in tokens]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top, "text_offset": offsets}


def with_output_logprobs(body: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses `response` whose first output text carries `logprobs`."""
    body["output"][0]["content"][0]["logprobs"] = entries
    return body


def with_choice(body: dict[str, Any], **members: Any) -> dict[str, Any]:
    """`body` with members of choices[0] replaced."""
    body["choices"][0].update(members)
    return body


IDENTICAL, CONTENT, TOOLS, FINISH, USAGE, SHAPE = (
    Verdict.IDENTICAL,
    Verdict.CONTENT,
    Verdict.TOOL_CALLS,
    Verdict.FINISH_REASON,
    Verdict.USAGE_ONLY,
    Verdict.SHAPE,
)

# (label, recorded, live, verdict, fingerprint_changed)
CASES: list[tuple[str, dict[str, Any], dict[str, Any], Verdict, bool]] = [
    ("identical", chat(), chat(), IDENTICAL, False),
    (
        "only id, created, service_tier differ",
        chat(),
        chat(id="chatcmpl-other", created=1741570999, service_tier="flex"),
        IDENTICAL,
        False,
    ),
    (
        "usage details differ (cached tokens)",
        chat(),
        chat(usage=token_usage(cached_tokens=10)),
        USAGE,
        False,
    ),
    (
        "usage only (completion tokens)",
        chat(),
        chat(usage=token_usage(completion_tokens=9)),
        USAGE,
        False,
    ),
    (
        "usage absent on one side (a stream without include_usage)",
        chat(),
        chat(usage=OMIT),
        IDENTICAL,
        False,
    ),
    ("content differs", chat(), chat("Paris is the capital of France."), CONTENT, False),
    (
        "content differs and usage too",
        chat(),
        chat("Paris!", usage=token_usage(completion_tokens=2)),
        CONTENT,
        False,
    ),
    (
        "tool call arguments differ",
        chat(None, tool_calls=[tool_call()]),
        chat(None, tool_calls=[tool_call(arguments='{"city":"Paris, FR"}')]),
        TOOLS,
        False,
    ),
    (
        "tool call arguments in another member order and spacing",
        chat(None, tool_calls=[tool_call(arguments='{"city":"Paris","unit":"c"}')]),
        chat(None, tool_calls=[tool_call(arguments='{"unit": "c", "city": "Paris"}')]),
        IDENTICAL,
        False,
    ),
    (
        "tool call arguments 1 against 1.0",
        chat(None, tool_calls=[tool_call(arguments='{"days":1,"all":true}')]),
        chat(None, tool_calls=[tool_call(arguments='{"days":1.0,"all":true}')]),
        IDENTICAL,
        False,
    ),
    (
        "tool call arguments true against 1",
        chat(None, tool_calls=[tool_call(arguments='{"all":true}')]),
        chat(None, tool_calls=[tool_call(arguments='{"all":1}')]),
        TOOLS,
        False,
    ),
    (
        "tool call name differs",
        chat(None, tool_calls=[tool_call()]),
        chat(None, tool_calls=[tool_call(name="get_forecast")]),
        TOOLS,
        False,
    ),
    (
        "tool call ids differ only",
        chat(None, tool_calls=[tool_call(id="call_abc123")]),
        chat(None, tool_calls=[tool_call(id="call_xyz789")]),
        IDENTICAL,
        False,
    ),
    (
        "an extra tool call",
        chat(None, tool_calls=[tool_call()]),
        chat(None, tool_calls=[tool_call(), tool_call(arguments='{"city":"Lyon"}', id="call_2")]),
        TOOLS,
        False,
    ),
    (
        "answered instead of calling the tool",
        chat(None, tool_calls=[tool_call()]),
        chat("It is sunny in Paris."),
        CONTENT,
        False,
    ),
    (
        "deprecated function_call differs",
        chat(None, message={"function_call": {"name": "f", "arguments": "{}"}}),
        chat(None, message={"function_call": {"name": "g", "arguments": "{}"}}),
        TOOLS,
        False,
    ),
    (
        "leftover stream index on a tool call",
        chat(None, tool_calls=[tool_call()]),
        chat(None, tool_calls=[{**tool_call(), "index": 0}]),
        SHAPE,
        False,
    ),
    ("finish_reason stop vs length", chat(), chat(finish_reason="length"), FINISH, False),
    (
        "finish_reason and usage differ",
        chat(),
        chat(finish_reason="length", usage=token_usage(completion_tokens=16)),
        FINISH,
        False,
    ),
    (
        "vLLM stop_reason differs",
        with_choice(chat(), stop_reason=None),
        with_choice(chat(), stop_reason="</s>"),
        FINISH,
        False,
    ),
    ("fingerprint changed, same output", chat(), chat(fingerprint="fp_other"), IDENTICAL, True),
    (
        "fingerprint changed and content",
        chat(),
        chat("Paris.", fingerprint="fp_other"),
        CONTENT,
        True,
    ),
    ("fingerprint null on one side", chat(), chat(fingerprint=None), IDENTICAL, False),
    ("fingerprint absent on one side", chat(fingerprint=OMIT), chat(), IDENTICAL, False),
    ("fingerprint null and content", chat(fingerprint=None), chat("Paris."), CONTENT, False),
    (
        "fingerprint null on both sides",
        chat(fingerprint=None),
        chat(fingerprint=None),
        IDENTICAL,
        False,
    ),
    ("a field added", chat(), chat(moderation={"flagged": False}), SHAPE, False),
    (
        "annotations differ",
        chat(message={"annotations": []}),
        chat(message={"annotations": [{"type": "url_citation"}]}),
        SHAPE,
        False,
    ),
    (
        "audio transcript differs",
        chat(None, message={"audio": audio("Paris.")}),
        chat(None, message={"audio": audio("Lyon.")}),
        CONTENT,
        False,
    ),
    (
        "audio id and expiry differ only",
        chat(None, message={"audio": audio()}),
        chat(None, message={"audio": {**audio(), "id": "audio_2", "expires_at": 1741579999}}),
        IDENTICAL,
        False,
    ),
    # A new snapshot explains a divergence, like a fingerprint; alone it is none.
    ("model snapshot differs", chat(), chat(model="gpt-4o-2024-11-20"), IDENTICAL, False),
    (
        "model snapshot and content differ",
        chat(),
        chat("Paris.", model="gpt-4o-2024-11-20"),
        CONTENT,
        False,
    ),
    ("model absent on one side", chat(), chat(model=OMIT), IDENTICAL, False),
    (
        "response model snapshot differs",
        response(),
        response(model="gpt-4o-2024-11-20"),
        IDENTICAL,
        False,
    ),
    ("refusal null vs absent", chat(), chat(message={"refusal": OMIT}), IDENTICAL, False),
    ("content null vs empty string", chat(None), chat(""), IDENTICAL, False),
    ("tool_calls [] vs absent", chat(), chat(tool_calls=[]), IDENTICAL, False),
    (
        "refusal differs",
        chat(None),
        chat(None, message={"refusal": "I can't help."}),
        CONTENT,
        False,
    ),
    (
        "vendor reasoning_content differs",
        chat(message={"reasoning_content": "France's capital..."}),
        chat(message={"reasoning_content": "The user asks..."}),
        CONTENT,
        False,
    ),
    (
        "logprob values jitter, same tokens",
        with_choice(chat(), logprobs=logprobs(["Paris", "."])),
        with_choice(chat(), logprobs=logprobs(["Paris", "."], jitter=1e-6)),
        IDENTICAL,
        False,
    ),
    (
        "logprobs of a refusal jitter",
        with_choice(chat(None), logprobs={"content": None, "refusal": token_logprobs(["No"])}),
        with_choice(
            chat(None), logprobs={"content": None, "refusal": token_logprobs(["No"], 0.01)}
        ),
        IDENTICAL,
        False,
    ),
    (
        "a logprobs token differs",
        with_choice(chat(), logprobs=logprobs(["Paris", "."])),
        with_choice(chat(), logprobs=logprobs(["Paris", "!"])),
        CONTENT,
        False,
    ),
    (
        "a logprobs token more",
        with_choice(chat(), logprobs=logprobs(["Paris", "."])),
        with_choice(chat(), logprobs=logprobs(["Paris", ".", "!"], jitter=0.1)),
        CONTENT,
        False,
    ),
    (
        "logprobs entries gain a member",
        with_choice(chat(), logprobs=logprobs(["Paris"])),
        with_choice(chat(), logprobs={"content": [{**token_logprobs(["Paris"])[0], "rank": 1}]}),
        SHAPE,
        False,
    ),
    (
        "vLLM prompt_logprobs jitter",
        chat(prompt_logprobs=[None, {"791": {"logprob": -7.1, "rank": 1}}]),
        chat(prompt_logprobs=[None, {"791": {"logprob": -7.2, "rank": 2}}]),
        IDENTICAL,
        False,
    ),
    (
        "vLLM completion prompt_logprobs jitter",
        with_choice(completion(), prompt_logprobs=[None, {"791": {"logprob": -7.1}}]),
        with_choice(completion(), prompt_logprobs=[None, {"791": {"logprob": -7.2}}]),
        IDENTICAL,
        False,
    ),
    (
        "completion logprobs jitter, top alternatives reordered",
        with_choice(completion(), logprobs=legacy_logprobs(["\n\n", "This"])),
        with_choice(completion(), logprobs=legacy_logprobs(["\n\n", "This"], jitter=0.2)),
        IDENTICAL,
        False,
    ),
    (
        "completion logprobs token differs",
        with_choice(completion(), logprobs=legacy_logprobs(["\n\n", "This"])),
        with_choice(completion(), logprobs=legacy_logprobs(["\n", "This"])),
        CONTENT,
        False,
    ),
    (
        "response logprobs jitter",
        with_output_logprobs(response(), token_logprobs(["Hello", "!"])),
        with_output_logprobs(response(), token_logprobs(["Hello", "!"], jitter=0.3)),
        IDENTICAL,
        False,
    ),
    (
        "response logprobs token differs",
        with_output_logprobs(response(), token_logprobs(["Hello", "!"])),
        with_output_logprobs(response(), token_logprobs(["Hello", "?"])),
        CONTENT,
        False,
    ),
    ("n=1 vs n=2", chat(), chat(n=2), SHAPE, False),
    ("n=1 vs n=2, choice 0 differs too", chat(), chat("Lyon.", n=2), CONTENT, False),
    (
        "llama.cpp timings differ",
        chat(timings={"predicted_ms": 1.5}),
        chat(timings={"predicted_ms": 2.0}),
        IDENTICAL,
        False,
    ),
    (
        "completion identical but id",
        completion(),
        completion(id="cmpl-other", created=1),
        IDENTICAL,
        False,
    ),
    ("completion text differs", completion(), completion("\n\nThis is a test"), CONTENT, False),
    (
        "completion finish_reason differs",
        completion(),
        with_choice(completion(), finish_reason="stop"),
        FINISH,
        False,
    ),
    (
        "response identical but ids and times",
        response(),
        response(id="resp_other", item_id="msg_other", created_at=1741476999, completed_at=1),
        IDENTICAL,
        False,
    ),
    ("response text differs", response(), response("Hi! What can I do for you?"), CONTENT, False),
    (
        "response echoes other metadata",
        response(),
        response(metadata={"run": "7"}, user="u"),
        IDENTICAL,
        False,
    ),
    (
        "response status incomplete, same text",
        response(),
        response(status="incomplete", incomplete_details={"reason": "max_output_tokens"}),
        FINISH,
        False,
    ),
    (
        "response function_call arguments differ",
        response(output=[function_call_item()]),
        response(output=[function_call_item(arguments='{"city":"Lyon"}', id="fc_2")]),
        TOOLS,
        False,
    ),
    (
        "response function_call ids differ only",
        response(output=[function_call_item(id="fc_1")]),
        response(output=[function_call_item(id="fc_2")]),
        IDENTICAL,
        False,
    ),
    (
        "response with an extra message item",
        response(),
        response(output=[*response()["output"], *response("And more.")["output"]]),
        CONTENT,
        False,
    ),
    (
        "response answered instead of calling the tool",
        response(output=[function_call_item()]),
        response(),
        CONTENT,
        False,
    ),
    (
        "response reasoning summary differs",
        response(output=[reasoning_item("Compute.")]),
        response(output=[reasoning_item("Look it up.")]),
        CONTENT,
        False,
    ),
    ("response usage only", response(), response(usage={"input_tokens": 10}), USAGE, False),
    ("embeddings identical", embeddings(), embeddings(), IDENTICAL, False),
    (
        "embeddings vectors differ",
        embeddings([0.1, 0.2, 0.3]),
        embeddings([0.1, 0.2, 0.31]),
        CONTENT,
        False,
    ),
    (
        "embeddings base64 differ",
        embeddings(b64(0.1, 0.2)),
        embeddings(b64(0.1, 0.25)),
        CONTENT,
        False,
    ),
    ("embeddings count differs", embeddings([1.0]), embeddings([1.0], [2.0]), SHAPE, False),
]


@pytest.mark.parametrize(
    ("recorded", "live", "verdict", "changed"),
    [pytest.param(r, lv, v, ch, id=label) for label, r, lv, v, ch in CASES],
)
def test_verdict(
    recorded: dict[str, Any], live: dict[str, Any], verdict: Verdict, changed: bool
) -> None:
    result = compare(recorded, live)
    assert result.verdict is verdict
    assert result.fingerprint_changed is changed
    assert result.diverged is (verdict not in (IDENTICAL, USAGE))
    # The verdict does not depend on which side is the recording.
    assert compare(live, recorded).verdict is verdict


@pytest.mark.parametrize(
    ("recorded", "live", "verdict"),
    [
        ({"output": [{"type": {"odd": 1}, "x": 1}]}, {"output": [{"type": [], "x": 2}]}, SHAPE),
        ({"choices": "none"}, {"choices": [{"text": "a"}]}, SHAPE),
        ({"choices": [{"message": None}]}, {"choices": [{"message": {"content": "a"}}]}, SHAPE),
        ({"data": [{"embedding": "not base64!"}]}, {"data": [{"embedding": [1.0]}]}, CONTENT),
        ({"system_fingerprint": 7, "a": float("nan")}, {"a": float("nan")}, IDENTICAL),
        ({}, {}, IDENTICAL),
    ],
)
def test_odd_bodies_do_not_break_compare(
    recorded: dict[str, Any], live: dict[str, Any], verdict: Verdict
) -> None:
    result = compare(recorded, live)
    assert result.verdict is verdict
    json.dumps(result.to_json())


@pytest.mark.parametrize("member", sorted(BOOKKEEPING))
def test_echoed_bookkeeping_members_are_ignored(member: str) -> None:
    # Requests differing only in these share a key, so their echoes must not split the verdict.
    recorded, live = _apply(response(), {member: "a"}), _apply(response(), {member: "b"})
    assert compare(recorded, live).verdict is IDENTICAL


@pytest.mark.parametrize("verdict", list(Verdict))
def test_only_a_different_output_is_a_divergence(verdict: Verdict) -> None:
    # DESIGN §1: a divergence is a live response whose output differs; usage is not output.
    diverged = verdict not in (IDENTICAL, USAGE)
    assert is_divergence(verdict) is is_divergence(verdict.value) is diverged


def test_usage_only_is_no_divergence() -> None:
    result = compare(chat(), chat(usage=token_usage(completion_tokens=9)))
    assert result.verdict is USAGE
    assert not result.diverged
    assert compare(chat(), chat(n=2)).diverged


def test_identical_has_no_differences_but_keeps_fingerprints() -> None:
    result = compare(chat(), chat(fingerprint="fp_new", id="other"))
    assert result.differences == ()
    assert (result.recorded_fingerprint, result.live_fingerprint) == ("fp_fc9f1d7035", "fp_new")
    assert result.to_json()["fingerprint_changed"] is True


def test_a_changed_logprobs_token_is_listed_and_the_values_are_not() -> None:
    recorded = with_choice(chat(), logprobs=logprobs(["Paris", "."]))
    live = with_choice(chat(), logprobs=logprobs(["Paris", "!"], jitter=0.1))
    result = compare(recorded, live)
    assert result.verdict is CONTENT
    assert [d.path for d in result.differences] == [
        "choices[0].logprobs.content[1].bytes[0]",
        "choices[0].logprobs.content[1].token",
    ]


def test_long_jittered_logprobs_are_identical_and_diverged_ones_stop_at_the_limit() -> None:
    tokens = [f"w{i}" for i in range(5_000)]
    recorded = with_choice(chat(), logprobs=logprobs(tokens))
    jittered = with_choice(chat(), logprobs=logprobs(tokens, jitter=1e-6))
    assert compare(recorded, jittered).verdict is IDENTICAL
    shifted = with_choice(chat(), logprobs=logprobs(["w", *tokens], jitter=1e-6))
    result = compare(recorded, shifted)
    assert result.verdict is CONTENT
    assert len(result.differences) == 50


def test_differences_name_paths_and_values() -> None:
    result = compare(chat(), chat("London.", id="other", usage=token_usage(completion_tokens=3)))
    assert result.differences == (
        Difference("choices[0].message.content", "The capital of France is Paris.", "London."),
        Difference("usage.completion_tokens", 7, 3),
        Difference("usage.total_tokens", 21, 17),
    )


def test_absent_side_is_marked() -> None:
    result = compare(chat(), chat(n=2))
    assert [(d.path, d.recorded) for d in result.differences] == [("choices[1]", ABSENT)]
    assert result.differences[0].live.startswith('{"index":1,')


def test_volatile_fields_never_listed() -> None:
    recorded = chat(None, tool_calls=[tool_call(id="call_1")])
    live = chat(
        None,
        tool_calls=[tool_call(id="call_2", arguments="{}")],
        id="x",
        created=2,
        fingerprint="fp_x",
        service_tier="flex",
    )
    paths = [d.path for d in compare(recorded, live).differences]
    assert paths == ["choices[0].message.tool_calls[0].function.arguments"]
    assert {"id", "created", "system_fingerprint", "usage", "service_tier"} <= VOLATILE


def test_differences_capped_with_the_deciding_ones_first() -> None:
    many = [f"t{i}" for i in range(300)]
    recorded = with_choice(chat("a b c"), logprobs=logprobs(many))
    live = with_choice(chat("a b d"), logprobs=logprobs([f"u{i}" for i in range(300)]))
    result = compare(recorded, live)
    assert result.verdict is Verdict.CONTENT
    assert len(result.differences) == 50
    # logprobs sort before message, but the content that decided the verdict is listed first.
    assert result.differences[0].path == "choices[0].message.content"
    assert result.differences[1].path.startswith("choices[0].logprobs.content[0]")


# --- logprobs lists, token by token ----------------------------------------------------------
#
# compare() finds the entries that differ in a long logprobs list at C speed and walks only those;
# these pairs check that it finds exactly what walking every entry finds.


def walked_entry_by_entry(recorded: Any, live: Any) -> Comparison:
    """What compare() finds when every container is first compared whole and every logprobs
    list is walked entry by entry."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(divergence._Collector, "whole", lambda self, path: True)
        patch.setattr(divergence._Collector, "token_list", lambda self, path: None)
        return compare(recorded, live)


def chat_logprobs(entries: Any, *, refusal: Any = None) -> dict[str, Any]:
    return with_choice(chat("a b c"), logprobs={"content": entries, "refusal": refusal})


def with_logprobs_choices(*lists: list[dict[str, Any]]) -> dict[str, Any]:
    body = chat("a b c", n=len(lists))
    for choice, entries in zip(body["choices"], lists, strict=True):
        choice["logprobs"] = {"content": entries, "refusal": None}
    return body


def words(count: int, prefix: str = "t") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def changed(entries: list[Any], index: int, **members: Any) -> list[Any]:
    """`entries` with members of one entry replaced (OMIT removes one)."""
    entries = [dict(entry) if isinstance(entry, dict) else entry for entry in entries]
    entries[index] = _apply(entries[index], members)
    return entries


def replaced(entries: list[Any], index: int, item: Any) -> list[Any]:
    return [*entries[:index], item, *entries[index + 1 :]]


def token_pairs() -> list[tuple[str, Any, Any]]:
    base = token_logprobs(words(600))
    jittered = token_logprobs(words(600), jitter=0.01)
    other_top = [
        {**e, "top_logprobs": [{"token": "y", "logprob": -2, "bytes": [121]}]} for e in base
    ]
    many_differ = token_logprobs(words(300) + words(300, "u"), jitter=0.01)
    # Token differences past the limit, and entries with a member more before and after it.
    late_members = [{**e, "rank": 1} if i >= 450 else e for i, e in enumerate(many_differ)]
    early_members = [{**e, "rank": 1} if i < 10 else e for i, e in enumerate(many_differ)]
    reordered = [{k: e[k] for k in reversed(list(e))} for e in jittered]
    only_values = [{"logprob": e["logprob"]} for e in base]
    legacy = legacy_logprobs(words(300))
    return [
        ("identical", chat_logprobs(base), chat_logprobs(token_logprobs(words(600)))),
        ("the same list", chat_logprobs(base), chat_logprobs(base)),
        ("values jitter", chat_logprobs(base), chat_logprobs(jittered)),
        ("top alternatives differ", chat_logprobs(base), chat_logprobs(other_top)),
        ("top absent", chat_logprobs(base), chat_logprobs(changed(jittered, 7, top_logprobs=OMIT))),
        ("logprob absent", chat_logprobs(base), chat_logprobs(changed(jittered, 7, logprob=OMIT))),
        (
            "a token changed in the middle",
            chat_logprobs(base),
            chat_logprobs(changed(jittered, 100, token="x", bytes=[120])),
        ),
        (
            "a token changed, not its bytes",
            chat_logprobs(base),
            chat_logprobs(changed(base, 99, token="x")),
        ),
        (
            "a token changed in the last block",
            chat_logprobs(base),
            chat_logprobs(changed(jittered, 599, token="x")),
        ),
        ("a token more", chat_logprobs(base), chat_logprobs(token_logprobs(words(601), 0.01))),
        (
            "a token inserted first",
            chat_logprobs(base),
            chat_logprobs(token_logprobs(["w", *words(600)])),
        ),
        ("bytes absent", chat_logprobs(base), chat_logprobs(changed(jittered, 50, bytes=OMIT))),
        ("bytes null", chat_logprobs(base), chat_logprobs(changed(jittered, 50, bytes=None))),
        (
            "bytes null and absent",
            chat_logprobs(changed(base, 50, bytes=None)),
            chat_logprobs(changed(jittered, 50, bytes=OMIT)),
        ),
        (
            "bytes empty and absent",
            chat_logprobs(changed(base, 3, bytes=[])),
            chat_logprobs(changed(jittered, 3, bytes=OMIT)),
        ),
        ("token absent", chat_logprobs(base), chat_logprobs(changed(jittered, 0, token=OMIT))),
        ("a member more", chat_logprobs(base), chat_logprobs(changed(jittered, 520, rank=2))),
        (
            "a null member more",
            chat_logprobs(base),
            chat_logprobs(changed(jittered, 520, rank=None)),
        ),
        (
            "a member on both sides",
            chat_logprobs(changed(base, 520, rank=2)),
            chat_logprobs(changed(jittered, 520, rank=2)),
        ),
        (
            "a member differing",
            chat_logprobs(changed(base, 520, rank=2)),
            chat_logprobs(changed(jittered, 520, rank=3)),
        ),
        (
            "a byte true, not 1",
            chat_logprobs(changed(base, 5, bytes=[1])),
            chat_logprobs(changed(jittered, 5, bytes=[True])),
        ),
        (
            "a byte 1.0, not 1",
            chat_logprobs(changed(base, 5, bytes=[1])),
            chat_logprobs(changed(jittered, 5, bytes=[1.0])),
        ),
        (
            "a member NaN on both sides",
            chat_logprobs(changed(base, 9, rank=math.nan)),
            chat_logprobs(changed(jittered, 9, rank=math.nan)),
        ),
        (
            "a member 0.0 and -0.0",
            chat_logprobs(changed(base, 9, rank=0.0)),
            chat_logprobs(changed(jittered, 9, rank=-0.0)),
        ),
        ("members in another order", chat_logprobs(base), chat_logprobs(reordered)),
        ("more token differences than listed", chat_logprobs(base), chat_logprobs(many_differ)),
        ("members more after the limit", chat_logprobs(base), chat_logprobs(late_members)),
        ("members more before the limit", chat_logprobs(base), chat_logprobs(early_members)),
        ("entries of values only", chat_logprobs(only_values), chat_logprobs(only_values[:450])),
        ("null and empty content", chat_logprobs(None), chat_logprobs([])),
        ("empty content and entries", chat_logprobs([]), chat_logprobs(base)),
        ("null content and entries", chat_logprobs(None), chat_logprobs(base)),
        (
            "null logprobs and entries",
            with_choice(chat("a b c"), logprobs=None),
            chat_logprobs(base),
        ),
        ("a null entry", chat_logprobs(base), chat_logprobs(replaced(jittered, 300, None))),
        ("a text entry", chat_logprobs(base), chat_logprobs(replaced(jittered, 300, "t300"))),
        ("a list entry", chat_logprobs(base), chat_logprobs(replaced(jittered, 300, [1]))),
        (
            "refusal logprobs jitter",
            chat_logprobs(None, refusal=token_logprobs(words(80))),
            chat_logprobs(None, refusal=token_logprobs(words(80), 0.5)),
        ),
        (
            "refusal logprobs differ",
            chat_logprobs(None, refusal=token_logprobs(words(80))),
            chat_logprobs(None, refusal=token_logprobs(words(79, "r"), 0.5)),
        ),
        (
            "response logprobs jitter",
            with_output_logprobs(response(), token_logprobs(words(120))),
            with_output_logprobs(response(), token_logprobs(words(120), 0.3)),
        ),
        (
            "response logprobs differ",
            with_output_logprobs(response(), token_logprobs(words(120))),
            with_output_logprobs(response(), changed(token_logprobs(words(121), 0.3), 60, rank=1)),
        ),
        (
            "completion logprobs jitter",
            with_choice(completion(), logprobs=legacy),
            with_choice(completion(), logprobs=legacy_logprobs(words(300), 0.2)),
        ),
        (
            "completion tokens differ past the limit",
            with_choice(completion(), logprobs=legacy),
            with_choice(completion(), logprobs=legacy_logprobs(["x", *words(300)], 0.2)),
        ),
        (
            "completion offsets 2.0, not 2",
            with_choice(completion(), logprobs={**legacy, "text_offset": [0, 2, 4]}),
            with_choice(completion(), logprobs={**legacy, "text_offset": [0, 2.0, 4]}),
        ),
        (
            "two choices, the first settling the walk",
            with_logprobs_choices(base, base),
            with_logprobs_choices(many_differ, late_members),
        ),
    ]


@pytest.mark.parametrize(
    ("recorded", "live"), [pytest.param(r, lv, id=label) for label, r, lv in token_pairs()]
)
def test_logprobs_token_by_token_finds_what_the_walk_finds(recorded: Any, live: Any) -> None:
    for a, b in ((recorded, live), (live, recorded)):
        assert compare(a, b) == walked_entry_by_entry(a, b)


def test_logprobs_entries_compare_tokens_bytes_and_other_members_only() -> None:
    base = token_logprobs(words(200))
    other_top = [{**e, "top_logprobs": [{"token": "y", "logprob": -2.0}]} for e in base]
    assert compare(chat_logprobs(base), chat_logprobs(other_top)).differences == ()
    null_bytes, no_bytes = changed(base, 50, bytes=None), changed(base, 50, bytes=OMIT)
    assert compare(chat_logprobs(null_bytes), chat_logprobs(no_bytes)).differences == ()
    expected = [
        (no_bytes, CONTENT, "content[50].bytes", "[116,53,48]", ABSENT),
        (changed(base, 5, bytes=[True, 53]), CONTENT, "content[5].bytes[0]", 116, True),
        (changed(base, 120, rank=2), SHAPE, "content[120].rank", ABSENT, 2),
    ]
    for live, verdict, path, recorded_value, live_value in expected:
        result = compare(chat_logprobs(base), chat_logprobs(live))
        assert result.verdict is verdict
        assert result.differences == (
            Difference(f"choices[0].logprobs.{path}", recorded_value, live_value),
        )


def mutated(entries: list[Any], rnd: random.Random) -> list[Any]:
    """`entries` with a few random changes of the kinds upstreams make, or none."""
    entries = [dict(entry) for entry in entries]
    for _ in range(rnd.choice((0, 1, 1, 2, 3, 8, 80))):
        i = rnd.randrange(len(entries))
        kind = rnd.randrange(9)
        if kind == 0:
            entries[i]["token"] = rnd.choice(("x", "t1", "", None))
        elif kind == 1:
            entries[i]["bytes"] = rnd.choice(([120], [True], [120.0], [], None))
        elif kind == 2:
            entries[i].pop(rnd.choice(("token", "bytes", "logprob", "top_logprobs")), None)
        elif kind == 3:
            entries[i][rnd.choice(("rank", "id"))] = rnd.choice((1, 1.0, True, None, [], "r"))
        elif kind == 4:
            entries[i]["logprob"] = rnd.random()
        elif kind == 5:
            entries[i]["top_logprobs"] = [{"token": "z", "logprob": -9.0, "bytes": [122]}]
        elif kind == 6:
            entries.insert(i, {"token": "w", "logprob": -1.0, "bytes": [119], "top_logprobs": []})
        elif kind == 7 and len(entries) > 1:
            del entries[i]
        else:
            entries[i] = dict(reversed(entries[i].items()))
    return entries


@pytest.mark.parametrize("seed", range(60))
def test_logprobs_token_by_token_finds_what_the_walk_finds_after_random_changes(seed: int) -> None:
    rnd = random.Random(seed)
    block = divergence._TOKEN_BLOCK
    base = token_logprobs(words(rnd.choice((1, block - 1, block, block + 1, 2 * block + 50))))
    lists = [mutated(base, rnd), mutated(base, rnd)]
    recorded = with_logprobs_choices(*lists)
    live = with_logprobs_choices(*(mutated(entries, rnd) for entries in lists))
    assert compare(recorded, live) == walked_entry_by_entry(recorded, live)


def test_only_the_differing_logprobs_entries_are_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = re.compile(r"choices\[0\]\.logprobs\.content\[\d+\]")
    walked: list[str] = []
    walk = divergence._walk

    def counted(a: Any, b: Any, path: str, sink: Any) -> None:
        if entry.fullmatch(path):
            walked.append(path)
        walk(a, b, path, sink)

    monkeypatch.setattr(divergence, "_walk", counted)
    recorded = chat_logprobs(token_logprobs(words(1_000)))
    assert compare(recorded, chat_logprobs(token_logprobs(words(1_000), 0.1))).verdict is IDENTICAL
    assert walked == []
    one = changed(token_logprobs(words(1_000), 0.1), 700, token="x")
    assert compare(recorded, chat_logprobs(one)).verdict is CONTENT
    assert walked == ["choices[0].logprobs.content[700]"]
    walked.clear()
    # A token more at the start: every entry differs, and the walk stops once the list is full.
    result = compare(recorded, chat_logprobs(token_logprobs(["w", *words(1_000)])))
    assert len(result.differences) == 50
    assert 0 < len(walked) <= 50


@pytest.mark.parametrize(
    "path",
    ["choices[0].logprobs.content", "choices[2].logprobs.refusal", "output[1].content[0].logprobs"],
)
def test_token_entries_leave_out_exactly_their_value_members(path: str) -> None:
    collector = divergence._Collector({}, {})
    assert collector.token_list(path) == divergence._ENTRY_VALUES
    for name in ("token", "bytes", "logprob", "top_logprobs", "rank", "id"):
        ignored = name in divergence._ENTRY_VALUES
        assert collector.ignore(f"{path}[3].{name}") is ignored


def test_to_json_round_trips() -> None:
    result = compare(chat(), chat("Paris is the capital.", fingerprint="fp_2"))
    event = result.to_json()
    assert json.loads(json.dumps(event)) == event
    assert set(event) == {
        "verdict",
        "fingerprint_changed",
        "recorded_fingerprint",
        "live_fingerprint",
        "differences",
        "similarity",
    }
    assert event["verdict"] == "content"
    assert event["differences"][0] == {
        "path": "choices[0].message.content",
        "recorded": "The capital of France is Paris.",
        "live": "Paris is the capital.",
    }
    sim = event["similarity"]
    assert set(sim) == {
        "text_ratio",
        "ngram_cosine_distance",
        "first_difference_at",
        "embedding_distance",
    }
    assert sim["text_ratio"] == round(sim["text_ratio"], 4)
    assert sim["embedding_distance"] is None


def test_to_json_rounds_to_four_places() -> None:
    result = Comparison(
        Verdict.CONTENT, (), Similarity(0.123456, 0.987654, 3, 0.00001), "fp_a", None
    )
    assert result.to_json()["similarity"] == {
        "text_ratio": 0.1235,
        "ngram_cosine_distance": 0.9877,
        "first_difference_at": 3,
        "embedding_distance": 0.0,
    }
    assert result.fingerprint_changed is False


# --- similarity -------------------------------------------------------------------------------


def test_similarity_of_identical_texts() -> None:
    assert compare(chat(), chat()).similarity == Similarity(1.0, 0.0, None, None)


def test_similarity_first_difference() -> None:
    sim = compare(chat("abc"), chat("abd")).similarity
    assert sim.first_difference_at == 2
    assert sim.text_ratio == pytest.approx(difflib.SequenceMatcher(None, "abc", "abd").ratio())


def test_similarity_when_one_text_extends_the_other() -> None:
    sim = compare(chat("Paris"), chat("Paris is lovely")).similarity
    assert sim.first_difference_at == 5
    assert sim.text_ratio == pytest.approx(2 * 5 / 20)


def test_similarity_of_unrelated_texts() -> None:
    sim = compare(chat("The quick brown fox jumps."), chat("Zyxwvu 123 qqq!")).similarity
    assert sim.ngram_cosine_distance is not None and sim.ngram_cosine_distance > 0.95
    assert sim.first_difference_at == 0


def test_similarity_without_text_is_none() -> None:
    assert compare(embeddings([1.0, 0.0]), embeddings([0.0, 1.0])).similarity.text_ratio is None
    sim = compare(chat(None), chat(""))
    assert sim.similarity == Similarity(None, None, None, None)


def test_similarity_against_an_empty_text() -> None:
    sim = compare(chat(None), chat("Now I answer.")).similarity
    assert (sim.text_ratio, sim.ngram_cosine_distance, sim.first_difference_at) == (0.0, 1.0, 0)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("The capital of France is Paris.", "The capital of France is Lyon."),
        ("Mars has two moons, Phobos and Deimos.", "Mars has 2 moons: Deimos and Phobos."),
        ("kitten", "sitting"),
        ("abcd", "bcda"),
    ],
)
def test_text_ratio_agrees_with_difflib(a: str, b: str) -> None:
    sim = compare(chat(a), chat(b)).similarity
    expected = difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    assert sim.text_ratio == pytest.approx(expected)


def long_pairs() -> list[tuple[str, str, str, float]]:
    """Long pairs past the exact budget, with difflib's ratio for each worked out by hand."""
    rng = random.Random(7)
    cjk = "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(4000))
    blob = "".join(rng.choices("0123456789abcdef", k=3000))
    prose = " ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 9))) for _ in range(900))
    return [
        ("Chinese, first and last changed", cjk, "X" + cjk[1:-1] + "Y", 3998 / 4000),
        ("a hex blob, first changed", blob, "f" + blob[1:], 2999 / 3000),
        # Every character but the 899 spaces is matched.
        ("prose rewrapped", prose, prose.replace(" ", "\n"), 1 - 899 / len(prose)),
    ]


@pytest.mark.parametrize(
    ("a", "b", "exact"), [p[1:] for p in long_pairs()], ids=[p[0] for p in long_pairs()]
)
def test_the_long_text_approximation_stays_near_difflib(a: str, b: str, exact: float) -> None:
    # Past the exact budget: texts without spaces are cut into 16-character words, and words
    # match whatever spaces precede them (these used to score 0.0).
    sim = compare(chat(a), chat(b)).similarity
    assert sim.text_ratio == pytest.approx(exact, abs=0.02)


@pytest.mark.parametrize("words", [3_000, 40_000])  # matched word by word / by word triples
def test_similarity_of_long_texts(words: int) -> None:
    rng = random.Random(words)
    vocabulary = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(3000)]
    a = " ".join(rng.choices(vocabulary, k=words))
    b = " ".join(rng.choices(vocabulary, k=words))
    middle = len(a) // 2
    drifted = a[:middle] + " a changed sentence " + a[middle:]
    unrelated_sim = compare(chat(a), chat(b)).similarity
    drifted_sim = compare(chat(a), chat(drifted)).similarity
    assert drifted_sim.first_difference_at == middle
    assert drifted_sim.text_ratio is not None and drifted_sim.text_ratio > 0.99
    assert unrelated_sim.text_ratio is not None and unrelated_sim.text_ratio < 0.5
    # Texts drawn from one vocabulary share most character trigrams, but still not as many.
    distances = (unrelated_sim.ngram_cosine_distance, drifted_sim.ngram_cosine_distance)
    assert distances[0] is not None and distances[1] is not None
    assert distances[0] > distances[1]


def test_embedding_distance_for_embeddings() -> None:
    sim = compare(embeddings([1.0, 0.0], [1.0, 1.0]), embeddings([1.0, 0.0], [1.0, 0.0])).similarity
    assert sim.embedding_distance == pytest.approx(1 - 1 / math.sqrt(2))
    assert compare(embeddings(), embeddings()).similarity.embedding_distance == 0.0
    base = compare(embeddings(b64(1.0, 0.0)), embeddings(b64(0.0, 1.0))).similarity
    assert base.embedding_distance == pytest.approx(1.0)


def test_embedding_vector_is_one_difference() -> None:
    result = compare(embeddings([0.5] * 1536), embeddings([0.25] * 1536))
    assert [d.path for d in result.differences] == ["data[0].embedding"]
    assert result.differences[0].recorded.startswith("[0.5,0.5,")
    assert len(result.differences[0].recorded) == 60


def test_cosine_distance_known_vectors() -> None:
    assert cosine_distance([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    assert cosine_distance([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(2.0)
    assert cosine_distance([1.0, 2.0], [2.0, 4.0]) == pytest.approx(0.0, abs=1e-12)
    assert cosine_distance([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 - 1 / math.sqrt(2))
    assert cosine_distance([0.3, 0.4], [0.3, 0.4]) == 0.0
    assert cosine_distance([0.0, 0.0], [0.0, 0.0]) == 0.0
    assert cosine_distance([0.0, 0.0], [1.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        cosine_distance([1.0], [1.0, 2.0])


def _reference_ngram_distance(a: str, b: str, n: int) -> float:
    n = min(n, len(a), len(b))
    ca = collections.Counter(a[i : i + n] for i in range(len(a) - n + 1))
    cb = collections.Counter(b[i : i + n] for i in range(len(b) - n + 1))
    dot = sum(ca[g] * cb[g] for g in ca)
    norm = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return 1 - dot / norm


def test_ngram_cosine_distance() -> None:
    assert ngram_cosine_distance("same text", "same text") == 0.0
    assert ngram_cosine_distance("", "") == 0.0
    assert ngram_cosine_distance("", "abc") == 1.0
    assert ngram_cosine_distance("abc", "xyz") == 1.0
    # Shorter than n: bigrams of both, "ab" shared by "ab" and "abc".
    assert ngram_cosine_distance("ab", "abc") == pytest.approx(1 - 1 / math.sqrt(2))
    with pytest.raises(ValueError):
        ngram_cosine_distance("a", "b", n=0)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_ngram_cosine_distance_matches_a_plain_count(n: int) -> None:
    rng = random.Random(n)
    for alphabet in ("ab", "abcdefgh ", "".join(chr(0x4E00 + i) for i in range(3000))):
        a = "".join(rng.choice(alphabet) for _ in range(400))
        b = "".join(rng.choice(alphabet) for _ in range(300))
        assert ngram_cosine_distance(a, b, n) == pytest.approx(_reference_ngram_distance(a, b, n))


def test_ngram_cosine_distance_accepts_lone_surrogates() -> None:
    assert 0.0 < ngram_cosine_distance("x\ud800yz", "x\ud801yz") <= 1.0


# --- json_paths_diff ----------------------------------------------------------------------------


def test_json_paths_diff_path_syntax() -> None:
    a = {"messages": [{"role": "user", "content": "Tell me about Mars"}], "n": 1, "seed": 1}
    b = {"messages": [{"role": "user", "content": "Tell us about Mars"}, {"x": 1}], "n": 1.0}
    assert json_paths_diff(a, b) == [
        Difference("messages[0].content", "Tell me about Mars", "Tell us about Mars"),
        Difference("messages[1]", ABSENT, '{"x":1}'),
        Difference("seed", 1, ABSENT),
    ]


def test_json_paths_diff_values_and_types() -> None:
    assert json_paths_diff({"a": 1}, {"a": 1.0}) == []
    assert json_paths_diff([0, 2.5], [0.0, 2.5]) == []
    assert json_paths_diff({"a": True}, {"a": 1}) == [Difference("a", True, 1)]
    assert json_paths_diff({"a": [True]}, {"a": [1]}) == [Difference("a[0]", True, 1)]
    assert json_paths_diff({"a": None}, {"a": 0}) == [Difference("a", None, 0)]
    assert json_paths_diff({"a": "1"}, {"a": 1}) == [Difference("a", "1", 1)]
    assert json_paths_diff({"a": {"b": 1}}, {"a": [1]}) == [Difference("a", '{"b":1}', "[1]")]
    assert json_paths_diff(1, 2) == [Difference("", 1, 2)]
    assert json_paths_diff(
        {"a": {"b": {"c": [1, {"d": 2}]}}}, {"a": {"b": {"c": [1, {"d": 3}]}}}
    ) == [Difference("a.b.c[1].d", 2, 3)]


def test_json_paths_diff_member_order_and_quoting() -> None:
    a = {"z": 1, "a": 1, "x.y": 1, "": 1}
    b = {"a": 2, "z": 2, "x.y": 2, "": 2}
    assert [d.path for d in json_paths_diff(a, b)] == ['[""]', "a", '["x.y"]', "z"]
    assert [d.path for d in json_paths_diff({"p": {"a b": 1}}, {"p": {"a b": 2}})] == ['p["a b"]']


def test_json_paths_diff_ignore_and_limit() -> None:
    a = {"keep": 1, "skip": {"deep": 1}, "items": list(range(10))}
    b = {"keep": 2, "skip": {"deep": 2}, "items": list(range(10, 20))}
    diff = json_paths_diff(a, b, ignore=lambda path: path.startswith("skip"))
    assert [d.path for d in diff][:2] == ["items[0]", "items[1]"]
    assert "skip.deep" not in [d.path for d in diff]
    assert len(json_paths_diff(a, b, limit=3)) == 3
    assert json_paths_diff(a, b, limit=0) == []


def test_json_paths_diff_does_not_flag_equal_subtrees() -> None:
    big = {"messages": [{"role": "user", "content": str(i)} for i in range(1000)], "t": 0}
    other = json.loads(json.dumps(big))
    other["t"] = 1
    assert json_paths_diff(big, other) == [Difference("t", 0, 1)]


# --- short and output_text ----------------------------------------------------------------------


def test_short() -> None:
    long = "x" * 100
    assert short(long) == "x" * 59 + "…"
    assert len(short(long)) == 60
    assert short("x" * 60) == "x" * 60
    assert short(long, 10) == "x" * 9 + "…"
    assert short({"a": [1, 2]}) == '{"a":[1,2]}'
    assert short(list(range(100))) == json.dumps(list(range(100)), separators=(",", ":"))[:59] + "…"
    assert short({"é": "ü"}) == '{"é":"ü"}'
    for scalar in (None, True, 3, 2.5):
        assert short(scalar) == scalar


def test_output_text_chat() -> None:
    body = chat("Hello", n=2)
    body["choices"][0]["message"]["content"] = "second"
    body["choices"][0]["index"] = 1
    body["choices"][1]["index"] = 0
    assert output_text(body) == "Hello\nsecond"
    calls = chat(None, tool_calls=[tool_call(), tool_call("get_time", "{}")])
    assert output_text(calls) == 'get_weather({"city":"Paris"})\nget_time({})'
    refused = chat(None, message={"refusal": "I can't."})
    assert output_text(refused) == "I can't."
    parts = chat(
        message={"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert output_text(parts) == "a\nb"


def test_output_text_includes_reasoning_first() -> None:
    for name in ("reasoning_content", "reasoning"):
        assert output_text(chat("Paris.", message={name: "The user asks."})) == (
            "The user asks.\nParis."
        )
    details = [{"type": "reasoning.summary", "summary": "Asked"}, {"type": "x", "text": "Look"}]
    assert output_text(chat("Paris.", message={"reasoning_details": details})) == (
        "Asked\nLook\nParis."
    )
    item = {**reasoning_item("Compute."), "content": [{"type": "reasoning_text", "text": "2+2"}]}
    assert output_text(response("4", output=[item, *response("4")["output"]])) == (
        "Compute.\n2+2\n4"
    )


def test_output_text_writes_json_arguments_canonically() -> None:
    spaced = chat(
        None, tool_calls=[tool_call(arguments='{ "unit" : "c", "city" : "Reykjav\\u00edk" }')]
    )
    assert output_text(spaced) == 'get_weather({"city":"Reykjavík","unit":"c"})'
    assert output_text(response(output=[function_call_item(arguments='{"days": 2.0}')])) == (
        'get_weather({"days":2})'
    )
    free_text = chat(None, tool_calls=[tool_call(arguments="not { json")])
    assert output_text(free_text) == "get_weather(not { json)"
    assert output_text(chat(None, tool_calls=[tool_call(arguments='{"x": 1e300}')])) == (
        'get_weather({"x":1e+300})'
    )


@pytest.mark.parametrize(
    ("recorded", "live"),
    [
        (
            chat(None, tool_calls=[tool_call(arguments='{"city":"Paris","unit":"c"}')]),
            chat(None, tool_calls=[tool_call(arguments='{ "unit": "c",\n "city": "Paris" }')]),
        ),
        (
            chat(None, tool_calls=[tool_call(arguments='{"days":1}')]),
            chat(None, tool_calls=[tool_call(arguments='{"days":1.0}')]),
        ),
        (
            response(output=[function_call_item(arguments='{"city":"Paris"}')]),
            response(output=[function_call_item(arguments='{"city": "Paris"}', id="fc_2")]),
        ),
    ],
)
def test_equivalent_tool_arguments_measure_no_distance(
    recorded: dict[str, Any], live: dict[str, Any]
) -> None:
    result = compare(recorded, live)
    assert result.verdict is IDENTICAL
    assert result.similarity == Similarity(1.0, 0.0, None)


def test_a_reasoning_divergence_is_measured() -> None:
    result = compare(
        chat(message={"reasoning_content": "France's capital..."}),
        chat(message={"reasoning_content": "The user asks..."}),
    )
    assert result.verdict is CONTENT
    assert result.similarity.text_ratio is not None and result.similarity.text_ratio < 1
    assert result.similarity.ngram_cosine_distance is not None
    assert result.similarity.ngram_cosine_distance > 0
    assert result.similarity.first_difference_at == 0

    summaries = compare(
        response(output=[reasoning_item("Compute.")]),
        response(output=[reasoning_item("Look it up.")]),
    )
    assert summaries.verdict is CONTENT
    assert summaries.similarity.first_difference_at == 0


def test_output_text_other_shapes() -> None:
    assert output_text(completion("once upon")) == "once upon"
    assert output_text(response("Hi there")) == "Hi there"
    assert output_text(response(output=[function_call_item()])) == 'get_weather({"city":"Paris"})'
    assert output_text(embeddings()) == ""
    assert output_text({"object": "model", "id": "gpt-4o"}) == ""
