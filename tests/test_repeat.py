"""`--repeat sequence` (DESIGN §5): the k-th identical request of a run gets the k-th sample."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request

UNSEEDED = chat_request(seed=None, temperature=1)


def answers(client: openai.OpenAI, times: int) -> list[str]:
    return [
        client.chat.completions.create(**UNSEEDED).choices[0].message.content or ""
        for _ in range(times)
    ]


def test_sequence_records_then_replays_the_kth_sample_for_the_kth_request(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    recorder = start_proxy(repeat="sequence")
    recorded = answers(recorder.client(), 3)
    assert len(set(recorded)) == 3, "an unseeded prompt asked three times: three answers"
    assert upstream.count() == 3
    [recording] = recorder.recordings()
    assert len(recording.samples) == 3
    recorder.stop()

    replayer = start_proxy(repeat="sequence", mode="replay")
    assert answers(replayer.client(), 3) == recorded
    with pytest.raises(openai.NotFoundError) as exhausted:
        replayer.client().chat.completions.create(**UNSEEDED)
    assert "identical request number 4" in str(exhausted.value)
    assert "only 3 sample(s)" in str(exhausted.value)
    assert upstream.count() == 3


def test_auto_records_a_new_sample_past_the_last_one(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    first_run = start_proxy(repeat="sequence")
    answers(first_run.client(), 2)
    first_run.stop()

    second_run = start_proxy(repeat="sequence")
    raws = [
        second_run.client().chat.completions.with_raw_response.create(**UNSEEDED) for _ in range(3)
    ]
    assert [status(raw) for raw in raws] == ["hit", "hit", "recorded"]
    assert len(second_run.recordings()[0].samples) == 3


def test_sequence_keeps_the_checks_of_a_replay(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The k-th sample is served only if it can answer: a pinned fingerprint it does not have,
    # or a usage chunk a stream recorded without one cannot give, is an explained miss.
    upstream.nondeterministic = True
    recorder = start_proxy(repeat="sequence")
    list(recorder.client().chat.completions.create(**UNSEEDED, stream=True))  # no usage chunk
    recorder.stop()

    replayer = start_proxy(repeat="sequence", mode="replay")
    with replayer.client() as client, pytest.raises(openai.NotFoundError) as pinned:
        client.chat.completions.create(
            **UNSEEDED, extra_headers={"X-Seedcache-Fingerprint": "fp_other"}
        )
    replayer.stop()
    replayer = start_proxy(repeat="sequence", mode="replay")  # a new run: counting from 1
    with replayer.client() as client, pytest.raises(openai.NotFoundError) as usage:
        list(
            client.chat.completions.create(
                **UNSEEDED, stream=True, stream_options={"include_usage": True}
            )
        )

    assert "not fp_other (X-Seedcache-Fingerprint" in str(pinned.value)
    assert "include_usage" in str(usage.value)
    assert upstream.count() == 1


def test_reuse_is_the_default_and_serves_one_sample(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    proxy = start_proxy()
    assert len(set(answers(proxy.client(), 3))) == 1
    assert upstream.count() == 1


def test_sequence_keeps_answers_that_differ_only_in_their_logprobs(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The same text with other logprobs (an upstream's jitter): still a sample of its own.
    asked = {**UNSEEDED, "logprobs": True}
    recorder = start_proxy(repeat="sequence")
    recorded = []
    for shift in (0.0, 0.25, 0.5):
        upstream.logprob_shift = shift
        answer = recorder.client().chat.completions.create(**asked)
        assert answer.choices[0].logprobs is not None and answer.choices[0].logprobs.content
        recorded.append(answer.choices[0].logprobs.content[0].logprob)
    assert len(recorder.recordings()[0].samples) == 3
    recorder.stop()

    replayer = start_proxy(repeat="sequence", mode="replay")
    replayed = [
        replayer.client().chat.completions.create(**asked).choices[0].logprobs for _ in range(3)
    ]
    assert [lp.content[0].logprob for lp in replayed if lp and lp.content] == recorded
    assert upstream.count() == 3
