"""The example's tests: they run against seedcache's recordings in tests/recordings.

`pytest` replays them offline (no API key, no network). To record new ones against the real API:
`OPENAI_API_KEY=... pytest --seedcache-mode auto`, then commit tests/recordings.
"""

from __future__ import annotations

import pytest
from trip_planner import stream_packing_list, suggest_trip, weather_question

pytestmark = pytest.mark.usefixtures("seedcache")


def test_suggestion_is_one_sentence() -> None:
    suggestion = suggest_trip("volcanoes")
    assert suggestion.endswith(".")
    assert suggestion.count(". ") == 0


def test_suggestions_are_reproducible() -> None:
    assert suggest_trip("volcanoes") == suggest_trip("volcanoes")


def test_packing_list_streams_in_pieces() -> None:
    pieces = stream_packing_list("Iceland")
    assert len(pieces) > 3
    assert "".join(pieces).endswith(".")


def test_weather_question_calls_the_tool() -> None:
    answer = weather_question("Do I need an umbrella in the capital of France today?")
    assert answer["tool"] == "get_weather"
    assert isinstance(answer["arguments"]["city"], str) and answer["arguments"]["city"]


@pytest.mark.seedcache(namespace="winter")
def test_namespaced_recording() -> None:
    # Recorded under its own namespace: the same question, a separate recording.
    assert suggest_trip("skiing")
