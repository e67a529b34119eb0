"""The local services the suite relies on really work together."""
import pytest

from orchestrator import storage


@pytest.mark.slow
def test_ray_data_reads_from_s3_server(ray_local, s3_bucket):
    import ray

    for i in range(3):
        storage.write_bytes(f"{s3_bucket}/blobs/{i}.bin", bytes([i]) * (i + 1))
    fs, path = storage.filesystem(f"{s3_bucket}/blobs")
    ds = ray.data.read_binary_files(path, filesystem=fs)
    assert sorted(len(r["bytes"]) for r in ds.take_all()) == [1, 2, 3]
    assert ray.cluster_resources()["CPU"] >= 4  # more logical CPUs than the 2 cores


@pytest.mark.slow
def test_mlflow_server_round_trip(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.create_experiment("harness")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["m"] == 1.5


def test_tiny_hf_checkpoints_load(tiny_hf):
    from transformers import AutoTokenizer, BertModel, CLIPVisionModel

    assert BertModel.from_pretrained(tiny_hf.bert).config.vocab_size == tiny_hf.vocab_size
    assert CLIPVisionModel.from_pretrained(tiny_hf.clip).config.hidden_size == 64
    assert len(AutoTokenizer.from_pretrained(tiny_hf.tokenizer)) == tiny_hf.vocab_size
