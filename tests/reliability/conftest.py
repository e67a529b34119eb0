"""Fixtures for fault tests: an S3 fault-injecting proxy in front of the session's moto server."""
from __future__ import annotations

import os

import pytest


@pytest.fixture
def s3_proxy(s3_server):
    """A fault proxy (no faults yet) in front of moto; this process's storage clients use it.

    Storage clients are cached per endpoint, so pointing ``AWS_ENDPOINT_URL`` at the proxy gives
    fresh clients; Ray workers started earlier keep the direct endpoint.
    """
    from orchestrator.devtools.faults.s3_proxy import S3FaultProxy

    proxy = S3FaultProxy(s3_server.endpoint, seed=7, max_consecutive=3).start()
    old = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    try:
        yield proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = old
        proxy.stop()
