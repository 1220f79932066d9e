"""The `seedcache` command line."""
