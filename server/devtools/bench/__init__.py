"""Benchmarks run by `loraserve bench`: every ratio is measured side by side in one run, with
the compared variants alternating round by round, so they share the machine's state (load,
clocks, caches). `bench serve` runs its gRPC side in a server process it starts, idle while the
in-process side runs."""
