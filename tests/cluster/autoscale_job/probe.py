"""Driver of the autoscaling test job: one task that needs a GPU, on a cluster whose head has
none; prints where it ran and which nodes the cluster had, as one JSON line."""
import json

import ray


@ray.remote(num_gpus=1, num_cpus=1)
def where() -> str:
    return ray.get_runtime_context().get_node_id()


def main() -> None:
    ray.init()
    before = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    node = ray.get(where.remote(), timeout=240)
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    print("AUTOSCALE_PROBE " + json.dumps({"before": before, "task_node": node, "nodes": nodes}), flush=True)


if __name__ == "__main__":
    main()
