"""Development tools: synthetic data, tiny HF assets and fault injection for tests, the demo and
benchmarks.  Nothing in a training or evaluation run imports this package; the ``synth`` and
``demo`` CLI verbs do."""
