"""The key rules of DESIGN §3, as tables of pairs that must and must not match."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from proxy.errors import ProxyError
from proxy.keys import (
    BOOKKEEPING,
    KEY_SCHEME,
    RequestIndex,
    canonical_body,
    check_body,
    describe_differences,
    make_key,
    normalise_path,
    parse_json,
    too_large_to_compare,
)


def chat(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tell me about Mars"},
        ],
        "seed": 123,
        "temperature": 0,
    }
    body.update(overrides)
    return body


def key(body: Any, path: str = "/v1/chat/completions", method: str = "POST", ns: str = "") -> str:
    return make_key(method, normalise_path(path), body, ns).key


def reordered(body: dict[str, Any]) -> dict[str, Any]:
    """The same members in reverse order, as SDK 3.x sends them compared with 1.x."""
    return dict(reversed(list(body.items())))


SAME = [
    ("sdk 1.x vs 3.x member order", chat(), reordered(chat())),
    ("1 vs 1.0", chat(temperature=1), chat(temperature=1.0)),
    ("0 vs 0.0", chat(temperature=0), chat(temperature=0.0)),
    ("nested 2 vs 2.0", chat(logit_bias={"50256": -100}), chat(logit_bias={"50256": -100.0})),
    ("null member dropped", chat(top_p=None), chat()),
    ("null seed is no seed", chat(seed=None), {k: v for k, v in chat().items() if k != "seed"}),
    (
        "nested members sorted",
        chat(response_format={"type": "json_object", "x": 1}),
        chat(response_format={"x": 1, "type": "json_object"}),
    ),
    *[
        (f"bookkeeping {name}", chat(), chat(**{name: value}))
        for name, value in [
            ("stream", True),
            ("stream_options", {"include_usage": True}),
            ("user", "u-1"),
            ("safety_identifier", "s"),
            ("metadata", {"a": "b"}),
            ("store", True),
            ("service_tier", "flex"),
            ("prompt_cache_key", "k"),
            ("prompt_cache_retention", "24h"),
            ("prompt_cache_options", {"x": 1}),
            ("request_id", "r"),
            ("priority", 3),
            ("cache_salt", "s"),
            ("kv_transfer_params", {}),
            ("id_slot", 0),
            ("timings_per_token", True),
            ("return_progress", True),
        ]
    ],
]

DIFFERENT = [
    ("seed differs", chat(seed=1), chat(seed=2)),
    ("seed vs no seed", chat(), {k: v for k, v in chat().items() if k != "seed"}),
    (
        "temperature omitted vs explicit default",
        {k: v for k, v in chat().items() if k != "temperature"},
        chat(temperature=1),
    ),
    ("message order", chat(), chat(messages=list(reversed(chat()["messages"])))),
    (
        "content string vs parts",
        chat(messages=[{"role": "user", "content": "hi"}]),
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    ),
    ("unknown member kept", chat(), chat(top_k=40)),
    ("unknown member value", chat(min_p=0.05), chat(min_p=0.1)),
    ("grammar", chat(grammar="root ::= 'a'"), chat(grammar="root ::= 'b'")),
    (
        "nested tool schema",
        chat(tools=[{"type": "function", "function": {"name": "a"}}]),
        chat(tools=[{"type": "function", "function": {"name": "b"}}]),
    ),
    ("string exactly as sent", chat(stop="\n"), chat(stop="\r\n")),
    (
        "unicode normal forms",
        chat(messages=[{"role": "user", "content": "caf\u00e9"}]),
        chat(messages=[{"role": "user", "content": "cafe\u0301"}]),
    ),
    (
        "nested null kept",
        chat(response_format={"type": "text", "x": None}),
        chat(response_format={"type": "text"}),
    ),
    ("max_tokens vs max_completion_tokens", chat(max_tokens=5), chat(max_completion_tokens=5)),
    ("bool vs int", chat(logprobs=True), chat(logprobs=1)),
    ("model", chat(), chat(model="gpt-4o")),
]


@pytest.mark.parametrize(("label", "a", "b"), SAME, ids=[c[0] for c in SAME])
def test_requests_that_must_share_a_key(label: str, a: Any, b: Any) -> None:
    assert key(a) == key(b), label


@pytest.mark.parametrize(("label", "a", "b"), DIFFERENT, ids=[c[0] for c in DIFFERENT])
def test_requests_that_must_not_share_a_key(label: str, a: Any, b: Any) -> None:
    assert key(a) != key(b), label


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/v1/chat/completions", "/chat/completions"),
        ("v1/chat/completions", "/v1/chat/completions"),
        ("/v1/models", "/models"),
    ],
)
def test_v1_prefix_is_normalised(a: str, b: str) -> None:
    assert key(chat(), path=a) == key(chat(), path=b)


def test_paths_methods_queries_and_namespaces_split_keys() -> None:
    base = key(chat())
    assert key(chat(), path="/v1/completions") != base
    assert key(chat(), method="PUT") != base
    assert (
        make_key("POST", normalise_path("/v1/chat/completions", "api-version=1"), chat()).key
        != base
    )
    assert key(chat(), ns="team-a") != base
    assert key(chat(), ns="team-a") != key(chat(), ns="team-b")


def test_key_material_is_versioned_and_hashed() -> None:
    canon = make_key("post", "/v1/chat/completions", chat(stream=True), "ns")
    lines = canon.material.split("\n")
    assert lines[:4] == [KEY_SCHEME, "ns", "POST", "/v1/chat/completions"]
    assert json.loads(lines[4]) == canonical_body(chat())
    assert canon.key == hashlib.sha256(canon.material.encode()).hexdigest()
    assert canon.model == "gpt-4o-mini" and canon.seed == 123


def test_canonical_json_is_compact_sorted_utf8() -> None:
    canon = make_key("POST", "/v1/x", {"b": 1.5, "a": "é", "c": [2.0, None]})
    assert canon.material.endswith('{"a":"é","b":1.5,"c":[2,null]}')


def test_every_bookkeeping_member_is_named_in_the_design() -> None:
    assert {"stream", "stream_options", "user", "metadata", "store", "service_tier"} <= BOOKKEEPING
    assert "seed" not in BOOKKEEPING and "temperature" not in BOOKKEEPING


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([1, 2], None),
        ("text", None),
        ({"model": 5, "messages": []}, "model"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [], "seed": "1"}, "seed"),
        ({"model": "m", "messages": [], "seed": 1.5}, "seed"),
        ({"model": "m", "messages": [], "seed": True}, "seed"),
        ({"model": "m", "messages": [], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [], "n": 2.5}, "n"),
    ],
)
def test_bodies_the_key_cannot_use_are_400(body: Any, param: str | None) -> None:
    with pytest.raises(ProxyError) as caught:
        check_body(body)
    assert caught.value.status == 400
    assert caught.value.param == param


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b'{"a": NaN}', b"\xff\xfe", b'{"a":1}x'])
def test_malformed_json_is_400(raw: bytes) -> None:
    with pytest.raises(ProxyError) as caught:
        parse_json(raw)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_json"


def test_integers_beyond_64_bits_are_valid_json_read_exactly() -> None:
    # Not as the nearest double (two such integers would share a key): check_storable then
    # refuses them with a 400, since no recording can hold them.
    assert parse_json(b'{"seed": 123456789012345678901234567890}')["seed"] == (
        123456789012345678901234567890
    )
    assert parse_json(b'{"seed": 1' + b"0" * 400 + b"}")["seed"] == 10**400


def test_the_index_names_the_nearest_recording_of_the_same_model() -> None:
    index = RequestIndex()
    recorded = {}
    for seed in range(300):
        body = chat(seed=seed, messages=[{"role": "user", "content": f"Question {seed}"}])
        canon = make_key("POST", "/v1/chat/completions", body)
        index.add(canon.key, "", "POST", canon.path, canon.body)
        recorded[seed] = canon.key
    other_model = make_key("POST", "/v1/chat/completions", chat(model="gpt-4o"))
    index.add(other_model.key, "", "POST", other_model.path, other_model.body)
    assert len(index) == 301

    asked = chat(seed=42, temperature=0.7, messages=[{"role": "user", "content": "Question 42"}])
    canon = make_key("POST", "/v1/chat/completions", asked)
    found = index.nearest(canon, canon.body)
    assert found is not None
    key, differences = found
    assert key == recorded[42]
    assert [(d.path, d.recorded, d.live) for d in differences] == [("temperature", 0.7, 0)]
    assert describe_differences(differences) == "temperature: 0.7 != 0"

    elsewhere = make_key("POST", "/v1/chat/completions", chat(model="o3"))
    assert index.nearest(elsewhere, elsewhere.body) is None


def test_among_recordings_that_differ_as_much_the_nearest_has_the_closest_values() -> None:
    # A parametrised test's prompts differ from each other at one path, as the changed prompt
    # differs from each: the one named is the one it was changed from.
    index = RequestIndex()
    recorded = {}
    for topic in ("volcanoes", "rivers", "deserts", "a river delta"):
        body = chat(messages=[{"role": "user", "content": f"Tell me about {topic}"}])
        canon = make_key("POST", "/v1/chat/completions", body)
        index.add(canon.key, "", "POST", canon.path, canon.body)
        recorded[topic] = canon.key

    asked = make_key(
        "POST",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "Tell me about river"}]),
    )
    found = index.nearest(asked, asked.body)

    assert found is not None
    key, differences = found
    assert key == recorded["rivers"]
    assert describe_differences(differences) == (
        "messages[0].content: 'Tell me about river' != 'Tell me about rivers'"
    )


def test_text_in_another_unicode_form_is_told_apart_in_the_description() -> None:
    # "café" typed (é composed) and taken from a macOS file name (e, then a combining accent).
    index = RequestIndex()
    recorded = make_key("POST", "/v1/x", {"prompt": "Describe café", "seed": 1})
    index.add(recorded.key, "", "POST", recorded.path, recorded.body)
    asked = make_key("POST", "/v1/x", {"prompt": "Describe cafe\u0301", "seed": 2})

    found = index.nearest(asked, asked.body)

    assert found is not None
    assert describe_differences(found[1]) == (
        "prompt: 'Describe cafe\\u0301' != 'Describe caf\\xe9' (the same text in another "
        "Unicode form); seed: 2 != 1"
    )


def test_describe_differences_lists_at_most_five() -> None:
    a = {f"m{i}": "x" for i in range(8)}
    b = {f"m{i}": "y" for i in range(8)}
    index = RequestIndex()
    canon_b = make_key("POST", "/v1/x", b)
    index.add(canon_b.key, "", "POST", canon_b.path, canon_b.body)
    canon_a = make_key("POST", "/v1/x", a)
    found = index.nearest(canon_a, canon_a.body)
    assert found is not None
    text = describe_differences(found[1])
    assert text.count("!=") == 5 and text.endswith("and 3 more")


@pytest.mark.parametrize(
    ("size", "said"),
    [
        (100, None),
        # 10,001 token ids, ~60 kB: too many values, which the message gave as "0.1 MB".
        (10_001, ". Its body (more than 10,000 JSON values) is too large to compare"),
        (700_000, ". Its body (4.8 MB of JSON) is too large to compare"),
    ],
)
def test_a_body_too_large_to_compare_is_said_so_by_what_makes_it_so(
    size: int, said: str | None
) -> None:
    canon = make_key("POST", "/v1/embeddings", {"model": "m", "input": list(range(size))})

    why = too_large_to_compare(canon)

    if said is None:
        assert why is None
    else:
        assert why is not None and why.startswith(said)


def test_the_index_keeps_no_leaves_of_a_recording_too_large_to_compare() -> None:
    # A batch of token ids: its leaves would cost memory for as long as the server runs (a few
    # dozen such recordings grew a replay server by 650 MB), for a comparison a request that
    # large never gets either.
    index = RequestIndex()
    embeddings = {"model": "text-embedding-3-small"}
    large = make_key("POST", "/v1/embeddings", {**embeddings, "input": [[7] * 1000] * 64})
    small = make_key("POST", "/v1/embeddings", {**embeddings, "input": [1, 2, 3]})
    for canon in (large, small):
        index.add(canon.key, "", "POST", canon.path, canon.body)

    assert len(index) == 1
    assert index.keys() == {large.key, small.key}  # read: a refresh does not read it again
    assert index.without({large.key}).keys() == {small.key}
    asked = make_key("POST", "/v1/embeddings", {**embeddings, "input": [1, 2, 4]})
    found = index.nearest(asked, asked.body)
    assert found is not None and found[0] == small.key
    assert index.too_large(asked)
    assert not index.without({large.key}).too_large(asked)
