"""The learning test's probe with each fault injected: does it fail when learning breaks?

    PYTHONPATH=$PWD python benchmarks/learning_faults.py [--seed 0] [--faults none lt_off ...]

Runs ``orchestrator.devtools.learning_probe.direction_probe`` (what ``tests/workloads/test_learning.py``
asserts: direction accuracy >= 85% on held-out clips, through the data plane and on their frames
decoded apart from it) once per fault:

- ``none``: the code as it is;
- ``lt_off``: the model without its local temporal module (``lt_enabled=false``);
- ``sampling_reversed``: the frame indices the sampler returns, reversed (``decode.sample_indices``);
- ``decode_shuffled``: the decoder's frames of each clip in a random order (``DecordReader.get``);
- ``train_transform_reversed``: the training transform returns the frames reversed;
- ``eval_transform_reversed``: the evaluation transform returns the frames reversed;
- ``collate_shuffled``: the collate shuffles the frames of each row (``pipeline._ContractCollate``).

Prints one line per fault and a JSON object with every figure on the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, when run as a script

from orchestrator.data import augment, decode, pipeline, video
from orchestrator.devtools.learning_probe import ProbeConfig, direction_probe

THRESHOLD = 85.0  # tests/workloads/test_learning.py
FAULTS = ("none", "lt_off", "sampling_reversed", "decode_shuffled", "train_transform_reversed",
          "eval_transform_reversed", "collate_shuffled")


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _shuffle_rows(frames, rng: np.random.Generator):
    """[B, T, ...] -> the T frames of each row in a random order (never the identity for T > 1)."""
    out = frames.clone()
    t = frames.shape[1]
    for i in range(frames.shape[0]):
        perm = rng.permutation(t)
        while t > 1 and (perm == np.arange(t)).all():
            perm = rng.permutation(t)
        out[i] = frames[i, perm]
    return out


def inject(fault: str):
    """A context manager that puts ``fault`` in place (``none`` and ``lt_off``: nothing to patch)."""
    rng = np.random.default_rng(123)
    if fault in ("none", "lt_off"):
        return contextlib.nullcontext()
    if fault == "sampling_reversed":
        real = decode.sample_indices
        return _patched(decode, "sample_indices", lambda *a, **k: list(reversed(real(*a, **k))))
    if fault == "decode_shuffled":
        real_get = video.DecordReader.get

        def get(self, indices):
            out = real_get(self, indices)
            return out[rng.permutation(len(out))]
        return _patched(video.DecordReader, "get", get)
    if fault == "train_transform_reversed":
        real_t = augment.train_transform
        return _patched(augment, "train_transform", lambda *a, **k: real_t(*a, **k)[::-1].copy())
    if fault == "eval_transform_reversed":
        real_e = augment.eval_transform
        return _patched(augment, "eval_transform", lambda *a, **k: real_e(*a, **k)[::-1].copy())
    if fault == "collate_shuffled":
        real_c = pipeline._ContractCollate

        def collate():
            inner = real_c()

            def call(batch):
                out = inner(batch)
                out["frames"] = _shuffle_rows(out["frames"], rng)
                return out
            return call
        return _patched(pipeline, "_ContractCollate", collate)
    raise ValueError(f"unknown fault {fault!r}; accepted: {FAULTS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for fault in args.faults:
        with inject(fault):
            r = direction_probe(ProbeConfig(seed=args.seed, lt_enabled=fault != "lt_off"))
        r["test_passes"] = r["truth"] >= THRESHOLD and r["data_plane"] >= THRESHOLD
        results[fault] = r
        print(f"{fault:<26} held-out: data plane {r['data_plane']:5.1f}%  decoded apart {r['truth']:5.1f}%  "
              f"last training batches {r['train']:5.1f}%  -> test {'passes' if r['test_passes'] else 'FAILS'}  "
              f"({r['cpu_s']:.0f} CPU-s)", flush=True)
    print(json.dumps({"threshold": THRESHOLD, "seed": args.seed, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
