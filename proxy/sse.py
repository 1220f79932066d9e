"""Server-sent events: a pure decode/encode state machine, stream completeness, assembling stored
chunks into the response a non-streaming client expects, and synthesising chunks from such a
response. Reading sockets and writing bodies is left to `upstream` and `handlers`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"

# WHATWG SSE: a line ends at CRLF, a lone CR or a lone LF.
_LINE_END = re.compile(r"\r\n|\r|\n")

_RESPONSE_FINISHED = frozenset({"response.completed", "response.incomplete"})
_RESPONSE_FAILED = frozenset({"error", "response.failed"})
_TERMINAL_BY_STATUS = {"incomplete": "response.incomplete", "failed": "response.failed"}

# Top-level chunk keys that are not copied as-is into an assembled response.
_NOT_COPIED = frozenset({"choices", "usage", "object", "obfuscation"})
# Top-level body keys every synthesised chunk carries (the rest ride on the last chunk).
_HEAD_KEYS = frozenset(
    {"id", "object", "created", "model", "service_tier", "system_fingerprint", "choices", "usage"}
)
# Strings inside streamed objects that arrive in pieces (tool-call arguments, custom tool input,
# audio data and transcript); every other nested string keeps its first non-null value.
_CONCAT_KEYS = frozenset({"arguments", "input", "data", "transcript"})
_MESSAGE_KEYS = frozenset({"role", "content", "refusal", "tool_calls"})
_CHAT_CHOICE_KEYS = frozenset({"index", "message", "logprobs", "finish_reason"})
_TEXT_CHOICE_KEYS = frozenset({"index", "text", "logprobs", "finish_reason"})


@dataclass(frozen=True, slots=True)
class Event:
    """One parsed SSE event: the data payload text, the `event:` name if any, arrival ms offset."""

    data: str
    event: str | None = None
    t_ms: int = 0


class Decoder:
    """Incremental WHATWG SSE decoder: feed bytes as they arrive, get complete events."""

    __slots__ = ("_data", "_event", "_pending", "_skip_lf", "_started", "_utf8", "bom", "utf8")

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # strict until a byte is not UTF-8
        self._started = False  # text has been decoded since the start (or the last flush)
        self._pending: list[str] = []  # pieces of a line whose end has not arrived yet
        self._skip_lf = False  # the last chunk ended in CR: an LF opening the next one is its CRLF
        self._data: list[str] = []
        self._event: str | None = None
        # What the bytes fed so far were like, for a caller deciding whether to keep the stream:
        # a client that reads them strictly (the openai SDK) fails on bytes that are not UTF-8,
        # and does not drop a leading BOM (its first field name is then "\ufeffdata").
        self.utf8 = True
        self.bom = False

    def decode(self, chunk: bytes, t_ms: int = 0) -> list[Event]:
        """Feed the next bytes; return the events they complete, stamped with `t_ms`."""
        try:
            text = self._utf8.decode(chunk)
        except UnicodeDecodeError:
            # From here on invalid bytes become U+FFFD, never raise. The decoder's buffer is
            # left as it was by the failed call, so the chunk is decoded again whole.
            self.utf8 = False
            self._utf8.errors = "replace"
            text = self._utf8.decode(chunk)
        if not self._started and text:
            self._started = True
            if text[0] == "\ufeff":  # WHATWG drops a leading BOM
                self.bom = True
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []
        events: list[Event] = []
        start = 0
        for match in _LINE_END.finditer(text):
            line = text[start : match.start()]
            if self._pending:
                self._pending.append(line)
                line = "".join(self._pending)
                self._pending.clear()
            self._process_line(line, t_ms, events)
            start = match.end()
        if start < len(text):
            self._pending.append(text[start:])
        self._skip_lf = text[-1] == "\r"
        return events

    def flush(self, t_ms: int = 0) -> list[Event]:
        """End of input: discard an unterminated event and reset; always returns []. `utf8` and
        `bom` keep describing every byte fed since the decoder was made."""
        # WHATWG: an event without its closing blank line is never dispatched, so a stream cut
        # mid-event cannot look complete.
        try:
            self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            self.utf8 = False  # the bytes end inside a UTF-8 sequence
        self._utf8.reset()
        self._started = False
        self._pending.clear()
        self._skip_lf = False
        self._data = []
        self._event = None
        return []

    def _process_line(self, line: str, t_ms: int, events: list[Event]) -> None:
        if not line:
            # A blank line dispatches only if a data line was seen; otherwise it just resets.
            if self._data:
                events.append(Event("\n".join(self._data), self._event, t_ms))
            self._data = []
            self._event = None
            return
        if line[0] == ":":
            return  # comment / keep-alive: llama.cpp sends ":", others ": keep-alive"
        name, _, value = line.partition(":")
        if value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        # `id` and `retry` steer browser reconnection, which a recorded stream never does.


def encode(event: Event) -> bytes:
    """Frame an event as SSE bytes: `event:` if named, a `data:` line per data line, blank line."""
    if not event.event and "\n" not in event.data and "\r" not in event.data:
        return b"data: " + event.data.encode() + b"\n\n"  # the common case, on the replay path
    lines = [f"event: {event.event}\n"] if event.event else []
    # Split on every SSE line end (not str.splitlines, which also splits on U+2028 and friends).
    lines.extend(f"data: {line}\n" for line in _LINE_END.split(event.data))
    lines.append("\n")
    return "".join(lines).encode()


def is_object_text(data: str) -> bool:
    """Whether an event's data is shaped as a JSON object, as every event of a stream is but the
    closing [DONE]: what a recording may hold, checked on each load, so by its braces alone (a
    parse of every event would double the cost of loading a long stream)."""
    text = data.strip()
    return text[:1] == "{" and text[-1:] == "}"


def is_complete(events: Sequence[Event], path: str) -> bool:
    """Whether a stream ended the way a successful one does on this path (DESIGN §5), with every
    event one a recording may hold (`is_object_text`), so that what is stored loads again."""
    if not all(event.data == DONE or is_object_text(event.data) for event in events):
        return False
    if path.partition("?")[0].rstrip("/").endswith("/responses"):
        # The Responses API sends no [DONE]; it ends with a terminal event.
        finished = False
        for event in events:
            # Named events need parsing only to look for an error inside them.
            parse = event.event is None or '"error"' in event.data
            obj = _json_object(event.data) if parse else None
            kind = _event_type(event, obj)
            if kind in _RESPONSE_FAILED or _has_error(obj):
                return False
            finished = finished or kind in _RESPONSE_FINISHED
        return finished
    # vLLM sends an error frame and then [DONE], so [DONE] alone does not mean success; others
    # name it `event: error`.
    return (
        bool(events)
        and events[-1].data == DONE
        and any(event.data.startswith("{") for event in events)  # [DONE] alone said nothing
        and not any(
            event.event == "error"
            or ('"error"' in event.data and _has_error(_json_object(event.data)))
            for event in events
        )
    )


def assemble(events: Sequence[Event]) -> dict[str, Any]:
    """Build the non-streaming response a client would have received from a stream's events."""
    pairs = [(event, obj) for event in events if (obj := _json_object(event.data)) is not None]
    if not pairs:
        raise ValueError(
            "cannot assemble a response from this stream: none of its events carries a JSON chunk"
        )
    if any(_event_type(event, obj).startswith("response.") for event, obj in pairs):
        return _assemble_response(pairs)
    return _assemble_chunks([obj for _, obj in pairs])


def synthesise(body: Mapping[str, Any], *, include_usage: bool) -> list[Event]:
    """Render a non-streamed response as the stream events that would have carried it."""
    kind = _body_kind(body)
    if kind == "response":
        stream = _ResponseStream()
        stream.render(dict(body))
        return stream.events
    text = kind == "text_completion"
    head: dict[str, Any] = {
        "id": body.get("id"),
        "object": "text_completion" if text else "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    if "service_tier" in body:
        head["service_tier"] = body["service_tier"]
    head["system_fingerprint"] = body.get("system_fingerprint")

    raw_choices = body.get("choices")
    choices = (
        [c for c in raw_choices if isinstance(c, Mapping)] if isinstance(raw_choices, list) else []
    )
    indexed = [(_int(c.get("index"), i), c) for i, c in enumerate(choices)]
    chunk_choices: list[dict[str, Any]] = []
    for index, choice in sorted(indexed, key=lambda pair: pair[0]):
        chunk_choices.extend(_text_choices(choice, index) if text else _chat_choices(choice, index))
    chunks = [{**head, "choices": [choice]} for choice in chunk_choices]
    if include_usage:
        # stream_options.include_usage: "usage": null on every chunk, then one chunk with
        # "choices": [] and the usage, just before [DONE].
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append({**head, "choices": [], "usage": body.get("usage")})
    if not chunks:
        chunks.append({**head, "choices": []})
    # Vendor top-level fields (llama.cpp `timings`, vLLM `prompt_logprobs`) go on the last chunk,
    # where llama.cpp puts them.
    chunks[-1].update((key, value) for key, value in body.items() if key not in _HEAD_KEYS)
    return [*(Event(_dumps(chunk)) for chunk in chunks), Event(DONE)]


# -- assembling ---------------------------------------------------------------------------------


class _Text(list[str]):
    """Pieces of a streamed string, joined once at the end (no quadratic concatenation)."""


def _merge(target: dict[str, Any], fragment: Mapping[str, Any], *, concat: bool = False) -> None:
    """Merge one streamed fragment into an accumulated object (strings concatenated if `concat`)."""
    for key, value in fragment.items():
        _merge_value(target, key, value, concat=concat or key in _CONCAT_KEYS)


def _merge_value(target: dict[str, Any], key: str, value: Any, *, concat: bool) -> None:
    current = target.get(key)
    if value is None:
        target.setdefault(key, None)
    elif isinstance(value, str) and concat:
        if isinstance(current, _Text):
            current.append(value)
        else:
            target[key] = _Text([value])
    elif isinstance(value, list):
        if isinstance(current, list) and not isinstance(current, _Text):
            current.extend(value)
        else:
            target[key] = list(value)
    elif isinstance(value, Mapping):
        nested = current if isinstance(current, dict) else {}
        _merge(nested, value)
        target[key] = nested
    elif current is None:
        target[key] = value


def _finish(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Join the accumulated string pieces of an object, recursively."""
    return {
        key: "".join(value)
        if isinstance(value, _Text)
        else _finish(value)
        if isinstance(value, dict)
        else value
        for key, value in fields.items()
    }


class _Choice:
    """The deltas of one choice index, accumulated."""

    __slots__ = ("extras", "fields", "finish_reason", "logprobs", "role", "tool_calls")

    def __init__(self) -> None:
        self.role: str | None = None
        self.fields: dict[str, Any] = {}
        self.tool_calls: dict[int, dict[str, Any]] | None = None
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None
        self.extras: dict[str, Any] = {}

    def add(self, choice: Mapping[str, Any], *, text: bool) -> None:
        for key, value in choice.items():
            if key == "index":
                continue
            if key == "delta" and isinstance(value, Mapping):
                self._add_delta(value)
            elif key == "text" and text:
                _merge_value(self.fields, key, value, concat=True)
            elif key == "logprobs":
                if isinstance(value, Mapping):
                    if self.logprobs is None:
                        self.logprobs = {}
                    _merge(self.logprobs, value)
            elif key == "finish_reason":
                if value is not None:
                    self.finish_reason = value
            elif value is not None or key not in self.extras:
                self.extras[key] = value  # vLLM `stop_reason`: the last non-null value

    def _add_delta(self, delta: Mapping[str, Any]) -> None:
        for key, value in delta.items():
            if key == "role":
                # Some servers repeat the role on every chunk: keep the first.
                if self.role is None and isinstance(value, str):
                    self.role = value
            elif key == "tool_calls" and isinstance(value, list):
                self._add_tool_calls(value)
            else:
                _merge_value(self.fields, key, value, concat=True)

    def _add_tool_calls(self, fragments: list[Any]) -> None:
        slots = self.tool_calls if self.tool_calls is not None else {}
        self.tool_calls = slots
        for fragment in fragments:
            if not isinstance(fragment, Mapping):
                continue
            index = fragment.get("index")
            if not isinstance(index, int):
                index = _unindexed_slot(slots, fragment.get("id"))
            _merge(slots.setdefault(index, {}), {k: v for k, v in fragment.items() if k != "index"})

    def chat_choice(self, index: int) -> dict[str, Any]:
        fields = _finish(self.fields)
        message = {
            "role": self.role or "assistant",
            "content": fields.pop("content", None),
            "refusal": fields.pop("refusal", None),
            # OpenAI's messages always carry it; streams send it only when there are some.
            "annotations": [],
        }
        message.update(fields)
        if self.tool_calls is not None:
            message["tool_calls"] = [
                _tool_call(self.tool_calls[i]) for i in sorted(self.tool_calls)
            ]
        logprobs = None
        if self.logprobs is not None:
            logprobs = {"content": None, "refusal": None, **_finish(self.logprobs)}
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason,
            **self.extras,
        }

    def text_choice(self, index: int) -> dict[str, Any]:
        fields = _finish(self.fields)
        return {
            "text": fields.get("text") or "",
            "index": index,
            "logprobs": None if self.logprobs is None else _finish(self.logprobs),
            "finish_reason": self.finish_reason,
            **self.extras,
        }


def _unindexed_slot(slots: Mapping[int, Mapping[str, Any]], call_id: Any) -> int:
    """Where a tool-call fragment without `index` goes (some OpenAI-compatible servers omit it)."""
    # A new id starts a new call; a fragment without an id continues the latest one.
    for index, slot in slots.items():
        if call_id is not None and slot.get("id") == call_id:
            return index
    if call_id is None and slots:
        return max(slots)
    return max(slots) + 1 if slots else 0


def _tool_call(slot: Mapping[str, Any]) -> dict[str, Any]:
    call = _finish(slot)
    result: dict[str, Any] = {
        "id": call.pop("id", None),
        "type": call.pop("type", None) or "function",
    }
    if result["type"] == "function":
        function = call.pop("function", None)
        function = function if isinstance(function, dict) else {}
        result["function"] = {
            "name": function.pop("name", None),
            "arguments": function.pop("arguments", None) or "",
            **function,
        }
    result.update(call)
    return result


def _assemble_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    text = _is_text_completion(chunks)
    top: dict[str, Any] = {}
    usage: Any = None
    choices: dict[int, _Choice] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            if key not in _NOT_COPIED and _unset(top.get(key)):
                top[key] = value  # the first value set wins
        # The include_usage chunk carries it once; vLLM continuous usage: the last one.
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        raw = chunk.get("choices")
        # n > 1: chunks of different choices interleave, so group them by index.
        for choice in raw if isinstance(raw, list) else []:
            if isinstance(choice, Mapping):
                index = _int(choice.get("index"), 0)
                choices.setdefault(index, _Choice()).add(choice, text=text)

    result: dict[str, Any] = {}
    if "id" in top:
        result["id"] = top.pop("id")
    result["object"] = "text_completion" if text else "chat.completion"
    for key in ("created", "model"):
        if key in top:
            result[key] = top.pop(key)
    result["choices"] = [
        choices[i].text_choice(i) if text else choices[i].chat_choice(i) for i in sorted(choices)
    ]
    # A completion always has `usage`; a stream without include_usage never said it: null.
    result["usage"] = usage
    result.update(top)
    return result


def _unset(value: Any) -> bool:
    """A chunk member that says nothing: Azure opens its streams with a content-filter chunk whose
    `id` and `model` are "" and `created` is 0, before the chunks that carry them."""
    return value is None or value == "" or (type(value) is int and value == 0)


def _is_text_completion(chunks: list[dict[str, Any]]) -> bool:
    """Legacy /v1/completions streams: object "text_completion" in every chunk, no `.chunk`."""
    for chunk in chunks:
        obj = chunk.get("object")
        if obj == "text_completion":
            return True
        if obj == "chat.completion.chunk":
            return False
        for choice in chunk.get("choices") or []:
            if isinstance(choice, Mapping) and ("text" in choice or "delta" in choice):
                return "delta" not in choice
    return False


def _assemble_response(pairs: list[tuple[Event, dict[str, Any]]]) -> dict[str, Any]:
    terminal = [obj for event, obj in pairs if _event_type(event, obj) in _RESPONSE_FINISHED]
    response = terminal[-1].get("response") if terminal else None
    if not isinstance(response, dict):
        raise ValueError(
            "cannot assemble a Responses API stream without a response.completed or "
            "response.incomplete event carrying the response"
        )
    return response


# -- synthesising -------------------------------------------------------------------------------


def _body_kind(body: Mapping[str, Any]) -> str:
    obj = body.get("object")
    if obj == "response" or (obj is None and "output" in body and "choices" not in body):
        return "response"
    if obj in ("chat.completion", "text_completion"):
        return str(obj)
    choices = body.get("choices")
    if obj is None and isinstance(choices, list):
        if any(isinstance(c, Mapping) and "text" in c for c in choices):
            return "text_completion"
        return "chat.completion"
    raise ValueError(
        f"cannot synthesise a stream from a body with object {obj!r}: "
        "expected chat.completion, text_completion or response"
    )


def _chat_choices(choice: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    raw_message = choice.get("message")
    message: Mapping[str, Any] = raw_message if isinstance(raw_message, Mapping) else {}
    content = message.get("content")
    refusal = message.get("refusal")
    # The first chunk is {"role": "assistant", "content": "", "refusal": null}; content stays
    # null there when the message has none (tool calls), so the assembled content is null too.
    first: dict[str, Any] = {
        "role": message.get("role") or "assistant",
        "content": "" if isinstance(content, str) else content,
        "refusal": "" if isinstance(refusal, str) else refusal,
    }
    leading: list[dict[str, Any]] = []  # vendor reasoning text streams before the answer (vLLM)
    trailing: list[dict[str, Any]] = []
    for key, value in message.items():
        if key in _MESSAGE_KEYS:
            continue
        if isinstance(value, str) and value:
            leading.append({key: value})
        elif key == "annotations" and value == []:
            continue  # never streamed empty: the SDK's accumulated message has None, as live
        elif not value:
            first[key] = value  # other empty fields (null) ride on the first chunk
        else:
            trailing.append({key: value})  # function_call, annotations, audio

    deltas = [first, *leading]
    logprobs_at = 0
    for key, value in (("content", content), ("refusal", refusal)):
        if isinstance(value, str) and value:
            if logprobs_at == 0:
                logprobs_at = len(deltas)
            deltas.append({key: value})
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        deltas.extend({"tool_calls": [{"index": i, **call}]} for i, call in enumerate(tool_calls))
    elif "tool_calls" in message:
        first["tool_calls"] = tool_calls
    deltas.extend(trailing)

    logprobs = choice.get("logprobs")
    chunks = [
        {
            "index": index,
            "delta": delta,
            "logprobs": logprobs if i == logprobs_at else None,
            "finish_reason": None,
        }
        for i, delta in enumerate(deltas)
    ]
    finish_reason = choice.get("finish_reason")
    extras = {k: v for k, v in choice.items() if k not in _CHAT_CHOICE_KEYS}
    chunks.append(
        {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason, **extras}
    )
    return chunks


def _text_choices(choice: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    finish_reason = choice.get("finish_reason")
    extras = {k: v for k, v in choice.items() if k not in _TEXT_CHOICE_KEYS}
    return [
        {
            "text": choice.get("text") or "",
            "index": index,
            "logprobs": choice.get("logprobs"),
            "finish_reason": None,
        },
        {"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason, **extras},
    ]


class _ResponseStream:
    """The Responses API events for one response, in the order the API sends them (§6.4)."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, name: str, **fields: Any) -> None:
        payload = {"type": name, "sequence_number": len(self.events), **fields}
        self.events.append(Event(_dumps(payload), name))

    def render(self, response: dict[str, Any]) -> None:
        in_progress = {**response, "status": "in_progress", "output": []}
        if "usage" in response:
            in_progress["usage"] = None
        self.emit("response.created", response=in_progress)
        self.emit("response.in_progress", response=in_progress)
        output = response.get("output")
        for output_index, item in enumerate(output if isinstance(output, list) else []):
            if isinstance(item, Mapping):
                self._item(output_index, item)
        status = response.get("status")
        terminal = _TERMINAL_BY_STATUS.get(status) if isinstance(status, str) else None
        self.emit(terminal or "response.completed", response=response)

    def _item(self, output_index: int, item: Mapping[str, Any]) -> None:
        # The SDK's `responses.stream()` helper needs output_item.added and content_part.added
        # before any delta that refers to them, and output_item.done before the end.
        kind = item.get("type")
        added = dict(item)
        if kind == "message":
            added["content"] = []
        elif kind == "function_call":
            added["arguments"] = ""
        elif kind == "reasoning" and isinstance(item.get("summary"), list):
            added["summary"] = []
        if "status" in item:
            added["status"] = "in_progress"
        self.emit("response.output_item.added", output_index=output_index, item=added)
        item_id = item.get("id")
        if kind == "message":
            parts = item.get("content")
            for content_index, part in enumerate(parts if isinstance(parts, list) else []):
                if isinstance(part, Mapping):
                    self._part(item_id, output_index, content_index, part)
        elif kind == "function_call":
            arguments = item.get("arguments") or ""
            where = {"item_id": item_id, "output_index": output_index}
            self.emit("response.function_call_arguments.delta", **where, delta=arguments)
            self.emit("response.function_call_arguments.done", **where, arguments=arguments)
        elif kind == "reasoning":
            summary = item.get("summary")
            for summary_index, part in enumerate(summary if isinstance(summary, list) else []):
                if isinstance(part, Mapping):
                    self._summary(item_id, output_index, summary_index, part)
        self.emit("response.output_item.done", output_index=output_index, item=item)

    def _summary(
        self, item_id: Any, output_index: int, summary_index: int, part: Mapping[str, Any]
    ) -> None:
        # What a UI showing the model's reasoning summary reads as it streams.
        where = {"item_id": item_id, "output_index": output_index, "summary_index": summary_index}
        text = part.get("text") or ""
        self.emit("response.reasoning_summary_part.added", **where, part={**part, "text": ""})
        self.emit("response.reasoning_summary_text.delta", **where, delta=text)
        self.emit("response.reasoning_summary_text.done", **where, text=text)
        self.emit("response.reasoning_summary_part.done", **where, part=part)

    def _part(
        self, item_id: Any, output_index: int, content_index: int, part: Mapping[str, Any]
    ) -> None:
        where = {"item_id": item_id, "output_index": output_index, "content_index": content_index}
        kind = part.get("type")
        if kind == "output_text":
            text = part.get("text") or ""
            logprobs = part.get("logprobs")
            logprobs = logprobs if isinstance(logprobs, list) else []
            empty = {**part, "text": ""}
            for key in ("annotations", "logprobs"):
                if key in part:
                    empty[key] = []
            self.emit("response.content_part.added", **where, part=empty)
            self.emit("response.output_text.delta", **where, delta=text, logprobs=logprobs)
            annotations = part.get("annotations")
            for annotation_index, annotation in enumerate(
                annotations if isinstance(annotations, list) else []
            ):
                self.emit(
                    "response.output_text.annotation.added",
                    **where,
                    annotation_index=annotation_index,
                    annotation=annotation,
                )
            self.emit("response.output_text.done", **where, text=text, logprobs=logprobs)
        elif kind == "refusal":
            refusal = part.get("refusal") or ""
            self.emit("response.content_part.added", **where, part={**part, "refusal": ""})
            self.emit("response.refusal.delta", **where, delta=refusal)
            self.emit("response.refusal.done", **where, refusal=refusal)
        else:
            self.emit("response.content_part.added", **where, part=part)
        self.emit("response.content_part.done", **where, part=part)


# -- JSON -----------------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _json_object(data: str) -> dict[str, Any] | None:
    """The payload as a JSON object, or None for [DONE], pings and anything not an object."""
    if data == DONE or not data.lstrip().startswith("{"):
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _event_type(event: Event, obj: Mapping[str, Any] | None) -> str:
    if event.event:
        return event.event
    kind = obj.get("type") if obj is not None else None
    return kind if isinstance(kind, str) else ""


def _has_error(obj: Mapping[str, Any] | None) -> bool:
    # The SDK raises APIError for any data whose JSON has a truthy top-level "error" (§3.3).
    return obj is not None and bool(obj.get("error"))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
