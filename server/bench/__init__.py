"""Benchmarks run by `loraserve bench`: every ratio is measured side by side in one process, so
the variants it compares share the machine's state (load, clocks, caches) within each round."""
