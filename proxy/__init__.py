"""seedcache: an OpenAI-compatible proxy that records, replays and audits LLM calls."""

__version__ = "0.1.0"
