"""Weights from storage load without unpickling code (issue 16, item 2): ``--init-from`` and
evaluation read safetensors, or DeepSpeed files through the weights-only unpickler; a pickle
that would run code is refused before it runs. Resuming reads only the run's own folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orchestrator import storage
from orchestrator.train import checkpoint, weights


class RunsCode:
    """Unpickling this calls Path(marker).touch(): stands in for any code an attacker picks."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_real_deepspeed_checkpoints_load_weights_only(ds_checkpoints, stage):
    want = torch.load(ds_checkpoints / "weights.pt", weights_only=True)
    got = weights.state_dict_from(str(ds_checkpoints / f"z{stage}"))
    assert set(got) == set(want)
    if stage == 0:
        for k in want:
            assert torch.equal(got[k].float(), want[k].float()), k


def _payload(path: Path, marker: Path, wrap) -> None:
    torch.save(wrap(RunsCode(str(marker))), path)
    assert not marker.exists()


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """The attack is real: a plain torch.load(weights_only=False) runs it (what the old loader did)."""
    marker = tmp_path / "ran"
    _payload(tmp_path / "x.pt", marker, lambda e: {"module": e})
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def test_model_states_pickle_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "ds").mkdir(parents=True)
    marker = tmp_path / "ran"
    _payload(ckpt / "ds" / "mp_rank_00_model_states.pt", marker, lambda e: {"module": {"w": torch.ones(1)}, "x": e})
    with pytest.raises(weights.UnsafeCheckpoint, match="refused to unpickle"):
        weights.state_dict_from(str(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize("stage,victim", [(2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                          (2, "mp_rank_00_model_states.pt"),
                                          (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                          (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_zero_checkpoint_pickles_are_refused(ds_checkpoints, tmp_path, stage, victim):
    """DeepSpeed's own zero_to_fp32 loaders (weights_only=False inside) go through the safe loader too."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ds_checkpoints / f"z{stage}", ckpt)
    marker = tmp_path / "ran"
    real = torch.load(ckpt / "ds" / victim, weights_only=False)
    _payload(ckpt / "ds" / victim, marker, lambda e: {**real, "extra": e})
    with pytest.raises(weights.UnsafeCheckpoint):
        weights.state_dict_from(str(ckpt))
    assert not marker.exists()


def test_init_from_s3_refuses_pickles_and_traversal(tmp_path, s3_bucket):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    _payload(bad, marker, lambda e: {"module": e})
    storage.write_bytes(s3_bucket + "/run/export/ds/mp_rank_00_model_states.pt", bad.read_bytes())
    with pytest.raises(weights.UnsafeCheckpoint):
        weights.state_dict_from(s3_bucket + "/run/export")
    assert not marker.exists()
    storage.write_bytes(s3_bucket + "/run2/export/../../../../../../../tmp/x", b"x")
    with pytest.raises(storage.UnsafeKey):
        weights.state_dict_from(s3_bucket + "/run2/export")


def test_resume_reads_only_the_runs_own_folder(tmp_path):
    run_dir = str(tmp_path / "store" / "exp" / "run")
    checkpoint.check_own(f"{run_dir}/checkpoint_step_00000010", run_dir)
    checkpoint.check_own("bucket/p/exp/run/checkpoint_step_00000010", "s3://bucket/p/exp/run")
    for other in (str(tmp_path / "store" / "exp" / "run-other" / "checkpoint_step_1"),
                  f"{run_dir}/../evil/checkpoint_step_1", "bucket/p/exp/other/checkpoint_step_1"):
        with pytest.raises(RuntimeError, match="own folder|this run's folder"):
            checkpoint.check_own(other, run_dir if not other.startswith("bucket") else "s3://bucket/p/exp/run")
