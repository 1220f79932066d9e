"""`seedcache audit`, `verify` and `probe`: parse options and call into `proxy.audit`,
`proxy.verify`, `proxy.probe` and `proxy.report`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cli.options import counted, progress, require_store, shown, store_option, store_spec
from proxy import report
from proxy.audit import AuditLog, parse_since, read_events, read_jsonl, select, summarise
from proxy.config import (
    DEFAULT_MAX_DIVERGENCE,
    DEFAULT_PROBE_MAX_TOKENS,
    DEFAULT_PROBE_RUNS,
    DEFAULT_PROBE_SEED,
    DEFAULT_PROBE_TEMPERATURE,
    DEFAULT_UPSTREAM,
    DEFAULT_VERIFY_CONCURRENCY,
    Config,
)
from proxy.errors import ConfigError, SeedcacheError
from proxy.recording import printable, redact_path
from proxy.stores.base import open_store

if TYPE_CHECKING:
    from proxy import verify as verifying

F = TypeVar("F", bound=Callable[..., Any])


def upstream_option(func: F) -> F:
    """`--upstream`, read from SEEDCACHE_UPSTREAM like `serve`'s."""
    return click.option(
        "--upstream",
        envvar="SEEDCACHE_UPSTREAM",
        default=DEFAULT_UPSTREAM,
        show_default=True,
        help="The API to send the requests to (env SEEDCACHE_UPSTREAM); a seedcache proxy's "
        "URL works too: the requests carry X-Seedcache-Mode: passthrough (not in replay mode: "
        "an answer from a recording is a failure).",
    )(func)


# --- audit --------------------------------------------------------------------------------------


@click.command()
@store_option
@click.option(
    "--audit-log",
    type=click.Path(exists=True, dir_okay=False),
    help="Read this JSONL audit log instead of the store's events.",
)
@click.option("--since", help="Only events since an ISO date/time or a duration ago: 30m, 24h, 7d.")
@click.option("--model", help="Only events of this model (requested or answered).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--html",
    "html_file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write a self-contained HTML report with charts to this file.",
)
def audit(
    store: str | None,
    audit_log: str | None,
    since: str | None,
    model: str | None,
    as_json: bool,
    html_file: str | None,
) -> None:
    """Summarise the audit events per model and fingerprint.

    For each: comparisons, identical, divergence rate, mean distances and fingerprint changes,
    as a table, --json, or --html FILE (a self-contained page with charts).
    """
    try:
        moment = parse_since(since) if since else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    spec = store_spec(store) if not audit_log else ""
    # What the output names: the report may be shared, so a Redis URL without its credentials.
    source = audit_log or shown(spec)
    if audit_log:
        raw = read_jsonl(audit_log)
    else:
        # Opening a store that does not exist would create it, and summarise a mistyped --store
        # as "no events": a drift gate that passes while measuring nothing.
        require_store(spec)
        raw = asyncio.run(_store_events(spec))
    events = select(raw, since=moment, model=model)
    groups = summarise(events)
    if html_file:
        page = report.html_page(events, groups, source=source)
        try:
            Path(html_file).write_text(page, encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot write the HTML report to {html_file}: {exc.strerror or exc}"
            ) from None
    if as_json:
        document = {
            "source": source,
            "since": moment.isoformat() if moment else None,
            "model": model,
            "events": len(events),
            "totals": report.totals(groups),
            "groups": groups,
        }
        click.echo(json.dumps(document, indent=2))
    elif not events:
        narrowed = " matching --since/--model" if (since or model) and raw else ""
        click.echo(
            f"No audit events{narrowed} in {source}. Events are written by `seedcache serve "
            "--mode audit` (or record, or --on-fingerprint-change refresh) and `seedcache verify`."
        )
    else:
        overall = report.totals(groups)
        click.echo(report.text_table(groups))
        click.echo(
            f"\n{counted(len(events), 'event')}: {report.same_output(overall)}, "
            f"{overall['divergences']} diverged "
            f"({overall['divergence_rate'] * 100:.1f}%), "
            f"{overall['fingerprint_changes']} with a fingerprint change"
            f"{model_note(overall)}.\n"
            f"{report.fingerprint_summary(overall)}"
        )
    if html_file:
        click.echo(f"HTML report written to {html_file}", err=True)


async def _store_events(spec: str) -> list[dict[str, Any]]:
    store = open_store(spec)
    try:
        return await read_events(store)
    finally:
        await store.close()


# --- verify -------------------------------------------------------------------------------------


@click.command()
@store_option
@upstream_option
@click.option("--sample", type=click.IntRange(min=1), help="Verify N recordings picked at random.")
@click.option("--model", help="Only recordings of this model.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_VERIFY_CONCURRENCY,
    show_default=True,
    help="Requests in flight at once.",
)
@click.option(
    "--max-divergence",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_MAX_DIVERGENCE,
    show_default=True,
    help="Exit 1 when the share of diverged recordings is above this fraction.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, writable=True),
    help="Append the audit events to this JSONL file (default: audit.jsonl in a disk store).",
)
def verify(
    store: str | None,
    upstream: str,
    sample: int | None,
    model: str | None,
    concurrency: int,
    max_divergence: float,
    audit_log: str | None,
) -> None:
    """Re-issue recorded requests live and compare with the recordings.

    Recordings are never modified; each comparison is an audit event. Exits 1 when the
    divergence rate is above --max-divergence or a request failed, 2 when nothing was verified
    (no store, or no recording left by the filters). The API key is read from OPENAI_API_KEY.
    """
    config = Config.build(store=store_spec(store), upstream=upstream, audit_log=audit_log)
    # Opening a store that does not exist would create it, and verify a mistyped --store with
    # nothing to compare: a drift check that always passes.
    require_store(config.store)
    api_key = _api_key(config.upstream_base)
    outcome, selection = asyncio.run(_verify(config, api_key, sample, model, concurrency))
    if selection.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(selection.skipped.items()))
        click.echo(f"skipped {counted(sum(selection.skipped.values()), 'recording')} ({reasons})")
    if not selection.recordings:
        # Nothing compared is no evidence of no drift: a gate must not pass on it (exit 2, as for
        # a store that does not exist).
        if selection.other_models:
            raise SeedcacheError(
                f"no recordings of model {model} to verify in {shown(config.store)} "
                f"({selection.other_models} of other models): nothing was verified"
            )
        raise SeedcacheError(
            f"no recordings to verify in {shown(config.store)}: nothing was verified"
        )
    for failure in outcome.failures:
        # The path a client sent, what the upstream said: neither may drive the terminal.
        path = redact_path(failure.path)
        click.echo(printable(f"failed {failure.key[:12]} {path}: {failure.message}"), err=True)
    if outcome.events:
        click.echo(report.text_table(summarise(outcome.events)))
    rate = outcome.divergence_rate
    click.echo(
        f"\nverified {len(outcome.events)} of {counted(len(selection.recordings), 'recording')} "
        f"against "
        f"{config.upstream_base}: {report.same_output(outcome.counts())}, "
        f"{outcome.divergences} diverged ({rate * 100:.1f}%), {len(outcome.failures)} failed."
    )
    if outcome.events:
        where = f"{config.audit_log_path} and the store" if config.audit_log_path else "the store"
        click.echo(f"{counted(len(outcome.events), 'audit event')} appended to {where}")
    if rate > max_divergence:
        click.echo(
            f"divergence rate {rate * 100:.1f}% is above --max-divergence "
            f"{max_divergence * 100:.1f}%",
            err=True,
        )
        sys.exit(1)
    if outcome.failures:
        sys.exit(1)


async def _verify(
    config: Config, api_key: str, sample: int | None, model: str | None, concurrency: int
) -> tuple[verifying.Outcome, verifying.Selection]:
    # Imported here: the openai SDK it needs takes a moment to load, and `serve` does without.
    from proxy import verify as verifying

    store = open_store(config.store, timeout=config.store_timeout)
    try:
        selection = await verifying.select_recordings(store, model=model, sample=sample)
        if not selection.recordings:
            return verifying.Outcome([], []), selection
        audit_log = AuditLog(config.audit_log_path, store)
        async with verifying.make_client(config.upstream_base, api_key) as client:
            with progress(len(selection.recordings), "verifying") as bar:
                outcome = await verifying.verify(
                    selection.recordings,
                    client=client,
                    audit=audit_log,
                    concurrency=concurrency,
                    on_done=lambda: bar.update(1),
                )
        return outcome, selection
    finally:
        await store.close()


# --- probe --------------------------------------------------------------------------------------


@click.command()
@click.option("--model", required=True, help="The model to probe.")
@click.option("--prompt", help="The user message to send.")
@click.option(
    "--messages",
    "messages_file",
    type=click.File("rb"),
    help="A JSON file with the list of chat messages to send (instead of --prompt).",
)
@upstream_option
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=DEFAULT_PROBE_RUNS,
    show_default=True,
    help="Requests per group.",
)
@click.option("--seed", type=int, default=DEFAULT_PROBE_SEED, show_default=True)
@click.option(
    "--temperature",
    type=float,
    help=f"Sampling temperature (default {DEFAULT_PROBE_TEMPERATURE}: the seed guide's value, "
    "which makes the seed's effect visible).",
)
@click.option(
    "--no-temperature",
    is_flag=True,
    help="Send no temperature (reasoning models such as the o-series take only the default).",
)
@click.option(
    "--max-tokens",
    type=int,
    help=f"Token limit, sent as max_tokens (default {DEFAULT_PROBE_MAX_TOKENS}).",
)
@click.option(
    "--max-completion-tokens",
    type=int,
    help="Token limit sent as max_completion_tokens instead of max_tokens, which reasoning "
    "models refuse (it counts reasoning tokens too).",
)
@click.option(
    "--compare-unseeded", is_flag=True, help="Also send the request --runs times without a seed."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def probe(
    model: str,
    prompt: str | None,
    messages_file: Any,
    upstream: str,
    runs: int,
    seed: int,
    temperature: float | None,
    no_temperature: bool,
    max_tokens: int | None,
    max_completion_tokens: int | None,
    compare_unseeded: bool,
    as_json: bool,
) -> None:
    """Measure how reproducible a model's outputs are, with and without a seed.

    Sends the same chat request --runs times with --seed (and as many times without, with
    --compare-unseeded) and reports how consistent the outputs and fingerprints were.

    Every request carries X-Seedcache-Mode: passthrough, so that pointed at a seedcache proxy
    the runs are live, not replays of one recording. The API key is read from OPENAI_API_KEY.

    A reasoning model (o-series) refuses max_tokens and any temperature but its default: probe
    it with --max-completion-tokens N --no-temperature.
    """
    from proxy import probe as probing  # the openai SDK loads only for the commands using it

    if (prompt is None) == (messages_file is None):
        raise click.UsageError("give either --prompt or --messages FILE")
    if temperature is not None and no_temperature:
        raise click.UsageError("give either --temperature or --no-temperature")
    if max_tokens is not None and max_completion_tokens is not None:
        raise click.UsageError("give either --max-tokens or --max-completion-tokens")
    if max_completion_tokens is None and max_tokens is None:
        max_tokens = DEFAULT_PROBE_MAX_TOKENS
    if temperature is None and not no_temperature:
        temperature = DEFAULT_PROBE_TEMPERATURE
    messages = None
    if messages_file is not None:
        try:
            messages = json.loads(messages_file.read())
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--messages") from None
        if messages is None:
            # Not "no --messages": the file was given, and holds null.
            raise click.BadParameter(
                'the file holds null, not a JSON list of messages like [{"role": "user", '
                '"content": …}]',
                param_hint="--messages",
            )
    try:
        settings = probing.Settings(
            model=model,
            messages=probing.messages_for(prompt, messages),
            runs=runs,
            seed=seed,
            temperature=temperature,
            max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens,
            compare_unseeded=compare_unseeded,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    base = Config.build(upstream=upstream).upstream_base
    plan = settings.plan()
    with (
        probing.make_client(base, _api_key(base)) as client,
        progress(len(plan), "probing") as bar,
    ):
        done = probing.run(client, plan, on_done=lambda: bar.update(1))
    groups = probing.summarise(done)
    if as_json:
        click.echo(json.dumps(probing.to_json(settings, base, done, groups), indent=2))
    else:
        click.echo(probing.render(done, groups))


def _api_key(upstream: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if upstream == DEFAULT_UPSTREAM.rstrip("/"):
        raise click.UsageError(f"set OPENAI_API_KEY to send requests to {upstream}")
    # Local servers (vLLM, llama.cpp, Ollama) usually take any key; the SDK insists on one.
    click.echo(
        f"OPENAI_API_KEY is not set: sending {upstream} a placeholder key (local servers take "
        "any); set OPENAI_API_KEY if it answers 401.",
        err=True,
    )
    return "seedcache-no-key"


def model_note(overall: dict[str, Any]) -> str:
    """ ", 2 answered by another model snapshot", when some were."""
    changes = int(overall.get("model_changes", 0))
    return f", {changes} answered by another model snapshot" if changes else ""
