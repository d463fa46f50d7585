"""Tools a user runs on finished runs (python -m tools.NAME): encoder comparisons, curriculum telemetry, charts."""
