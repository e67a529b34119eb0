"""Driver of the evaluate-on-workers test job: runs ``python -m orchestrator evaluate`` in this
process with every ``torch.nn.Module`` forward of the driver counted, then prints the count and the
node the driver ran on as one JSON line (``EVAL_DRIVER_PROBE {...}``)."""
import json
import sys

import torch


def main() -> int:
    calls = {"n": 0}
    original = torch.nn.Module.__call__

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    torch.nn.Module.__call__ = counted
    from orchestrator.cli import main as cli_main

    rc = cli_main(["evaluate", *sys.argv[1:]])
    import ray

    print("EVAL_DRIVER_PROBE " + json.dumps({"rc": rc, "driver_forwards": calls["n"],
                                              "driver_node": ray.get_runtime_context().get_node_id()}), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
