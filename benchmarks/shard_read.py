"""Reading a webdataset shard from S3: requests and time, the pyarrow stream as read before vs today.

A shard of ``--members`` members of ``--member-mb`` MiB each is written to a moto S3 server on
loopback; each read goes through the S3 proxy of ``orchestrator/devtools/faults`` with no faults,
which counts the requests, and (``--latency-ms``, default 10) delays every request by that much,
as an object store's time to first byte does (loopback answers in well under a millisecond).

  stream  what ``wds.iter_samples`` read through before: pyarrow's S3 input stream under
          ``tarfile`` (mode ``r|``), which asks its file object for 10 KiB at a time; pyarrow's S3
          files issue one ranged GET per read;
  now     ``wds.iter_samples`` today: ``storage.open_input``, one ranged GET per 8 MiB buffer
          (``storage.S3_READ_CHUNK``), a body that breaks off read again from its offset.

Both read every member's bytes (checked against what was written).  Rounds alternate the two.  The
last line is a JSON object: per path the GETs and the median seconds per shard, and the ratios.

    python benchmarks/shard_read.py [--members 8] [--member-mb 1] [--latency-ms 10] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
            return proc, endpoint
        except Exception:
            time.sleep(0.25)
    proc.kill()
    raise TimeoutError("moto did not start")


def _shard(members: int, size: int) -> tuple[bytes, dict[str, bytes]]:
    from orchestrator.devtools.synth import tar_bytes

    data = {f"{i:04d}.mp4": os.urandom(size) for i in range(members)}
    return tar_bytes(list(data.items())), data


def read_stream(uri: str) -> dict[str, bytes]:
    """The shard through pyarrow's S3 input stream, as ``wds.iter_samples`` opened it before."""
    from orchestrator import storage

    fs, path = storage.filesystem(uri)
    out = {}
    with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for m in tar:
            out[m.name] = tar.extractfile(m).read()
    return out


def read_now(uri: str) -> dict[str, bytes]:
    from orchestrator.data.sources.wds import iter_samples

    return {f"{key}.mp4": sample["mp4"] for key, sample in iter_samples(uri)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--member-mb", type=float, default=1.0)
    ap.add_argument("--latency-ms", type=float, default=10.0, help="added to every request by the proxy")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    proc, endpoint = _moto()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_ENDPOINT_URL": endpoint})
    from orchestrator import storage
    from orchestrator.devtools.faults.s3_proxy import FaultSpec, S3FaultProxy

    try:
        storage.s3_client().create_bucket(Bucket="bench")
        blob, want = _shard(args.members, int(args.member_mb * 2 ** 20))
        uri = "s3://bench/shards/000000.tar"
        storage.write_bytes(uri, blob)
        latency = FaultSpec(delay=1.0, delay_s=args.latency_ms / 1000) if args.latency_ms > 0 else FaultSpec()
        with S3FaultProxy(endpoint, {k: latency for k in ("get", "head")}, seed=0) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint  # storage clients are cached per endpoint: fresh ones
            results: dict[str, dict[str, list]] = {"stream": {"s": [], "gets": []}, "now": {"s": [], "gets": []}}
            for _ in range(args.rounds):
                for name, read in (("stream", read_stream), ("now", read_now)):
                    before = proxy.stats()["requests"].get("get", 0)
                    t0 = time.perf_counter()
                    got = read(uri)
                    took = time.perf_counter() - t0
                    if got != want:
                        raise SystemExit(f"{name}: the members read differ from those written")
                    results[name]["s"].append(took)
                    results[name]["gets"].append(proxy.stats()["requests"]["get"] - before)
                    print(json.dumps({"path": name, "s": round(took, 3), "gets": results[name]["gets"][-1]}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    summary = {"shard_mb": round(len(blob) / 2 ** 20, 2), "members": args.members, "latency_ms": args.latency_ms,
               "rounds": args.rounds}
    for name, r in results.items():
        summary[name] = {"gets": statistics.median(r["gets"]), "s": round(statistics.median(r["s"]), 3)}
    summary["gets_stream_over_now"] = round(summary["stream"]["gets"] / summary["now"]["gets"], 1)
    summary["time_stream_over_now"] = round(summary["stream"]["s"] / summary["now"]["s"], 1)
    print(f"a {summary['shard_mb']} MiB shard of {args.members} members, {args.latency_ms:g} ms per request: "
          f"the pyarrow stream {summary['stream']['gets']:.0f} GETs, {summary['stream']['s']:.2f} s; today "
          f"{summary['now']['gets']:.0f} GETs, {summary['now']['s']:.2f} s "
          f"({summary['gets_stream_over_now']}x fewer GETs, {summary['time_stream_over_now']}x faster)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
