"""`--repeat sequence` (DESIGN §5): the k-th identical request of a run gets the k-th sample."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from proxy.recording import Recording
from tests.conftest import RunningProxy, StartProxy, status
from tests.fake_upstream import FakeUpstream, chat_request

UNSEEDED = chat_request(seed=None, temperature=1)


def answers(client: openai.OpenAI, times: int) -> list[str]:
    return [
        client.chat.completions.create(**UNSEEDED).choices[0].message.content or ""
        for _ in range(times)
    ]


def run(start_proxy: StartProxy, times: int, mode: str = "auto") -> list[str]:
    """One run of a --repeat sequence proxy that asks the unseeded question `times` times: its
    answers, in order."""
    proxy = start_proxy(repeat="sequence", mode=mode)
    got = answers(proxy.client(), times)
    proxy.stop()
    return got


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
    run(start_proxy, 2)

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


def contents(recording: Recording) -> list[str]:
    """The answer each sample of a recording gives, in their order."""
    return [sample.response()["choices"][0]["message"]["content"] for sample in recording.samples]


def test_record_replaces_the_samples_so_that_a_replay_gets_what_the_run_saw(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    old = run(start_proxy, 2)

    rerecord = start_proxy(repeat="sequence", mode="record")
    new = answers(rerecord.client(), 2)
    assert not set(new) & set(old), "the upstream answers otherwise now"
    [recording] = rerecord.recordings()
    assert contents(recording) == new
    rerecord.stop()

    assert run(start_proxy, 2, mode="replay") == new
    assert upstream.count() == 4


def rerecord_two_of_three(start_proxy: StartProxy) -> tuple[RunningProxy, list[str]]:
    """A run that recorded three answers, then a record run, still going, that asked twice: the
    record proxy and its two answers."""
    run(start_proxy, 3)
    rerecord = start_proxy(repeat="sequence", mode="record")
    return rerecord, answers(rerecord.client(), 2)


def test_record_with_fewer_requests_drops_the_samples_past_them(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    rerecord, new = rerecord_two_of_three(start_proxy)
    # The older third sample stays while the run goes on, and goes when it ends.
    assert contents(rerecord.recordings()[0])[:2] == new
    assert len(rerecord.recordings()[0].samples) == 3
    rerecord.stop()
    assert contents(rerecord.recordings()[0]) == new

    replayer = start_proxy(repeat="sequence", mode="replay")
    assert answers(replayer.client(), 2) == new
    with pytest.raises(openai.NotFoundError) as past:
        replayer.client().chat.completions.create(**UNSEEDED)
    assert "identical request number 3" in str(past.value)
    assert "only 2 sample(s)" in str(past.value)


def ask_together(proxy: RunningProxy, upstream: FakeUpstream) -> list[str]:
    """Two identical requests in flight together, the first answered last; their answers in the
    order they were asked."""
    upstream.hang_next(0.6)

    async def ask(after: float) -> str:
        await asyncio.sleep(after)
        async with proxy.async_client() as client:
            answer = await client.chat.completions.create(**UNSEEDED)
        return answer.choices[0].message.content or ""

    async def both() -> list[str]:
        return list(await asyncio.gather(ask(0), ask(0.2)))

    return asyncio.run(both())


def test_record_replaces_each_sample_of_requests_in_flight_together(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    old = run(start_proxy, 3)

    rerecord = start_proxy(repeat="sequence", mode="record")
    new = ask_together(rerecord, upstream)
    rerecord.stop()

    assert not set(new) & set(old)
    assert run(start_proxy, 2, mode="replay") == new


def test_a_new_recording_keeps_every_answer_of_requests_in_flight_together(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The second is answered first: the first answer must not take its place.
    upstream.nondeterministic = True
    recorder = start_proxy(repeat="sequence", mode="record")
    recorded = ask_together(recorder, upstream)
    assert sorted(contents(recorder.recordings()[0])) == sorted(recorded)


def test_auto_stores_the_same_answer_twice_so_that_a_replay_gets_both(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    recorder = start_proxy(repeat="sequence")
    first, again = answers(recorder.client(), 2)
    assert first == again, "a deterministic upstream"
    assert len(recorder.recordings()[0].samples) == 2
    recorder.stop()

    assert run(start_proxy, 2, mode="replay") == [first, again]
    assert upstream.count() == 2


def test_auto_replaces_in_place_a_sample_it_cannot_serve_and_keeps_the_others(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    recorder = start_proxy(repeat="sequence")
    for _ in range(2):  # streams without their usage
        list(recorder.client().chat.completions.create(**UNSEEDED, stream=True))
    [before] = recorder.recordings()
    recorder.stop()

    # The first sample cannot give the usage asked for: recorded again, in its place.
    with_usage = {**UNSEEDED, "stream": True, "stream_options": {"include_usage": True}}
    rerun = start_proxy(repeat="sequence")
    raw = rerun.client().chat.completions.with_raw_response.create(**with_usage)
    assert status(raw) == "recorded"
    live = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    [after] = rerun.recordings()
    assert contents(after) == [live, contents(before)[1]]
    rerun.stop()

    replayer = start_proxy(repeat="sequence", mode="replay")
    chunks = list(replayer.client().chat.completions.create(**with_usage))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == live
    assert chunks[-1].usage is not None


def test_a_sequence_rerecord_compares_each_answer_with_the_sample_at_its_place(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The upstream answers the 1st, 2nd, 3rd call of a run the same way each run: nothing
    # diverged, though each answer differs from the newest sample.
    upstream.nondeterministic = True
    old = run(start_proxy, 2)
    upstream._generation = 0  # the next run starts the upstream's answers over

    rerecord = start_proxy(repeat="sequence", mode="record")
    new = answers(rerecord.client(), 3)

    assert new[:2] == old
    assert [event["verdict"] for event in rerecord.events()] == ["identical", "identical"]
    assert len(rerecord.recordings()[0].samples) == 3


def test_audit_records_a_sample_past_the_last_and_keeps_the_others(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    recorded = run(start_proxy, 2)

    auditor = start_proxy(repeat="sequence", mode="audit")
    raws = [
        auditor.client().chat.completions.with_raw_response.create(**UNSEEDED) for _ in range(3)
    ]
    assert [status(raw) for raw in raws] == ["audited"] * 3
    assert [raw.headers["x-seedcache-verdict"] for raw in raws] == ["content", "content", "new"]
    third = raws[2].parse().choices[0].message.content
    [recording] = auditor.recordings()
    assert contents(recording) == [*recorded, third]
    assert len(auditor.events()) == 2, "a new sample is recorded, not compared"
    auditor.stop()

    assert run(start_proxy, 3, mode="replay") == [*recorded, third]


def test_a_sample_of_another_fingerprint_is_replayed_marked_stale(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    upstream.nondeterministic = True
    recorded = run(start_proxy, 2)
    upstream.fingerprint = "fp_fake0002"
    seer = start_proxy()
    seer.client().chat.completions.create(**chat_request())  # the current fingerprint moves
    seer.stop()

    # `fail` does not apply under sequence: the k-th sample is the answer, said to be stale.
    replayer = start_proxy(repeat="sequence", mode="replay", on_fingerprint_change="fail")
    raws = [
        replayer.client().chat.completions.with_raw_response.create(**UNSEEDED) for _ in range(2)
    ]

    assert [status(raw) for raw in raws] == ["stale", "stale"]
    assert [raw.parse().choices[0].message.content for raw in raws] == recorded
    stats = replayer.stats()
    assert (stats["stale"], stats["hits"]) == (2, 0)


def test_a_call_retried_after_an_error_records_at_its_place(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The SDK retries a 429 itself: its retry answers the first call, not the second.
    upstream.nondeterministic = True
    run(start_proxy, 3)
    upstream.fail_next(429, headers={"retry-after-ms": "10"})

    rerecord = start_proxy(repeat="sequence", mode="record")
    new = answers(rerecord.client(max_retries=1), 3)
    rerecord.stop()

    assert upstream.count() == 3 + 4, "the first call was sent twice"
    assert contents(rerecord.recordings()[0]) == new
    assert run(start_proxy, 3, mode="replay") == new


def test_auto_replaces_a_sample_it_cannot_serve_with_the_retry_of_its_call(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Streams recorded without their usage cannot answer a request for it: auto replaces each in
    # place, the first with the retry of a call that met a 429.
    upstream.nondeterministic = True
    recorder = start_proxy(repeat="sequence")
    for _ in range(3):
        list(recorder.client().chat.completions.create(**UNSEEDED, stream=True))
    recorder.stop()
    upstream.fail_next(429, headers={"retry-after-ms": "10"})

    rerun = start_proxy(repeat="sequence")
    live = streamed_answers(rerun.client(max_retries=1), 3)
    rerun.stop()

    assert upstream.count() == 3 + 4, "the first call was sent twice"
    assert contents(rerun.recordings()[0]) == live
    replayer = start_proxy(repeat="sequence", mode="replay")
    assert streamed_answers(replayer.client(), 3) == live


def streamed_answers(client: openai.OpenAI, times: int) -> list[str]:
    """The unseeded question asked `times` times as a stream with its usage: the answers."""
    asked = {**UNSEEDED, "stream": True, "stream_options": {"include_usage": True}}
    return [
        "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**asked)
            if c.choices
        )
        for _ in range(times)
    ]


def test_a_record_run_whose_last_call_failed_keeps_no_sample_for_it(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # The run reached two answers: the older third sample is dropped when it ends, as if it had
    # asked twice, rather than replayed to a call that got an error.
    upstream.nondeterministic = True
    rerecord, new = rerecord_two_of_three(start_proxy)
    upstream.fail_next(500)
    with pytest.raises(openai.InternalServerError):
        rerecord.client().chat.completions.create(**UNSEEDED)
    rerecord.stop()

    assert contents(rerecord.recordings()[0]) == new


def test_requests_in_flight_together_are_recorded_in_the_order_they_arrived(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Three identical requests, each sent once the one before reached the upstream; the first
    # is answered last. Each answer is stored at the place of its request, so that a replay
    # run asking in the same order gives each caller what it got live.
    upstream.nondeterministic = True
    first, second, third = (upstream.hold_next() for _ in range(3))
    recorder = start_proxy(repeat="sequence")
    clients = [recorder.client() for _ in range(3)]

    def ask(k: int) -> str:
        return clients[k].chat.completions.create(**UNSEEDED).choices[0].message.content or ""

    with ThreadPoolExecutor(3) as pool:
        calls = [pool.submit(ask, 0)]
        assert first.arrived.wait(10)
        for k, hold in ((1, second), (2, third)):
            calls.append(pool.submit(ask, k))
            assert hold.arrived.wait(10)
            hold.release()
        assert second.answered.wait(10) and third.answered.wait(10)
        first.release()
        live = [call.result(timeout=30) for call in calls]

    assert len(set(live)) == 3
    assert contents(recorder.recordings()[0]) == live
    recorder.stop()
    assert run(start_proxy, 3, mode="replay") == live


def test_a_failed_request_in_flight_with_others_keeps_its_number_and_loses_no_answer(
    start_proxy: StartProxy, upstream: FakeUpstream
) -> None:
    # Three identical requests at once; the first meets a 429, and the SDK retries it once the
    # other two are stored. Had it given its number back, its retry would have taken place 0,
    # where the second one's answer was stored (answers are added after the last sample), and
    # been served that answer: one answer lost, and a replay of the run one sample short.
    upstream.nondeterministic = True
    upstream.fail_next(429, headers={"retry-after-ms": "500"})
    recorder = start_proxy(repeat="sequence")
    clients = [recorder.client(max_retries=1) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        live = list(pool.map(lambda client: answers(client, 1)[0], clients))

    assert upstream.count() == 4  # the 429, its retry and the two others
    assert len(set(live)) == 3
    stored = contents(recorder.recordings()[0])
    assert sorted(stored) == sorted(live)
    recorder.stop()
    assert sorted(run(start_proxy, 3, mode="replay")) == sorted(live)
