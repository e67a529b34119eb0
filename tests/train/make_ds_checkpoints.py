"""Write real DeepSpeed checkpoints (ZeRO 0, 2 and 3) of a small module, one process, gloo on CPU;
then, in the same process (one DeepSpeed start for both), the async checkpointer's deferred host
copies on real engines (``ds_deferred_save.py``).

Usage: python make_ds_checkpoints.py OUT_DIR  ->  OUT_DIR/z0, z2, z3 (each with a 'ds/' tag),
OUT_DIR/weights.pt (the module's final state dict, saved with weights only, for comparison) and
OUT_DIR/deferred.jsonl (one line per engine of ``ds_deferred_save.main``)."""
import os
import sys

import deepspeed
import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
os.environ.setdefault("MASTER_PORT", "29631")


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (0, 2, 3):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        cfg = {"train_micro_batch_size_per_gpu": 1,
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
        eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
        loss = eng(torch.ones(1, 4)).sum()
        eng.backward(loss)
        eng.step()
        eng.save_checkpoint(os.path.join(out, f"z{stage}"), tag="ds", client_state={"step": 1})
        if stage == 0:
            torch.save({k: v.detach().clone() for k, v in m.state_dict().items()}, os.path.join(out, "weights.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(os.path.dirname(here))]  # ds_deferred_save, the repository
    import ds_deferred_save

    ds_deferred_save.main(os.path.join(sys.argv[1], "deferred"), os.path.join(sys.argv[1], "deferred.jsonl"))
