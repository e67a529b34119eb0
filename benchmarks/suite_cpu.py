"""Where the CPU of a command goes, by kind of process (what the test suite's time is made of).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/suite_cpu.py [--out cpu.json] -- .venv/bin/python -m pytest -m slow

Runs the command and samples every process on the machine each ``--every`` seconds (psutil); each
process is put under a kind: the Ray actor or task it runs (``ray::TrainController``,
``ray::RayTrainWorker``, ``ray::MapBatches``, ...), a Ray daemon (raylet, gcs_server, log_monitor,
dashboard), the compiler (``cc1plus``: a JIT-built op), ``mlflow``, ``moto``, the test process, other
Python.  Prints CPU seconds (user + system) and process count per kind, the wall time and the
machine's busy CPU seconds (``/proc/stat``: user + nice + system; Ray's workers run niced), and a
JSON object with all of it on the last line.  Processes that start and end between two samples
are missed, and each process's last half second before it ends; the figures are a lower bound.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import time

import psutil

RAY_DAEMONS = ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env_agent", "monitor.py")


def kind(cmdline: list[str], name: str) -> str:
    text = " ".join(cmdline) if cmdline else name
    m = re.search(r"ray::([A-Za-z_][A-Za-z0-9_]*)", text)
    if m:
        return "ray::" + m.group(1)
    for daemon in RAY_DAEMONS:
        if daemon in text:
            return daemon
    for k in ("cc1plus", "mlflow", "moto.server", "pytest", "java", "chrom", "default_worker.py"):
        if k in text:
            return k
    return (cmdline[0].rsplit("/", 1)[-1] if cmdline else name)[:40]


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return (user + nice + system) / 100.0  # USER_HZ


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--every", type=float, default=0.5)
    p.add_argument("--out", default=None)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --")
    before = {}
    for proc in psutil.process_iter(["pid", "create_time", "cpu_times"]):
        ct = proc.info["cpu_times"]
        if ct is not None:
            before[(proc.info["pid"], proc.info["create_time"])] = ct.user + ct.system
    cpu: dict[tuple[int, float], float] = {}
    kinds: dict[tuple[int, float], str] = {}
    t0, busy0 = time.time(), busy_seconds()
    child = subprocess.Popen(command)
    while True:
        done = child.poll() is not None
        for proc in psutil.process_iter(["pid", "create_time", "cmdline", "name", "cpu_times"]):
            info = proc.info
            if info["cpu_times"] is None:
                continue
            key = (info["pid"], info["create_time"])
            cpu[key] = info["cpu_times"].user + info["cpu_times"].system - before.get(key, 0.0)
            k = kind(info["cmdline"] or [], info["name"] or "?")
            # a Ray worker is "ray::IDLE" / default_worker.py until it runs something: keep the last named kind
            if key not in kinds or k not in ("ray::IDLE", "default_worker.py"):
                kinds[key] = k
        if done:
            break
        time.sleep(args.every)
    wall, busy = time.time() - t0, busy_seconds() - busy0
    by = collections.defaultdict(lambda: [0.0, 0])
    for key, seconds in cpu.items():
        if seconds > 0.05:
            by[kinds[key]][0] += seconds
            by[kinds[key]][1] += 1
    rows = sorted(by.items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for _, v in rows)
    print(f"wall {wall:.0f} s; machine busy {busy:.0f} CPU-s ({busy / wall:.2f} cores); sampled processes {total:.0f} CPU-s")
    for k, (seconds, n) in rows[:40]:
        print(f"{seconds:9.1f} CPU-s {n:5d} processes  {k}")
    result = {"returncode": child.returncode, "wall_s": wall, "busy_cpu_s": busy, "sampled_cpu_s": total,
              "by_kind": {k: {"cpu_s": round(s, 1), "processes": n} for k, (s, n) in rows}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
