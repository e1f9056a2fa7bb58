"""Tooling around the server, not part of what it runs: synthetic DeepSeek bases and tokenizers,
random PEFT adapters, the demo, the benchmarks, and a real server process for tests and
benchmarks. Installed with the package (`loraserve demo`, `init-model` and `bench` use it); needs
the `serve` extra."""
