import textwrap

import pytest

from orchestrator.config import ConfigError, RunSpec, load_config, parse_override
from orchestrator.mappings import flatten


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunSpec)
    assert cfg.train.betas == (0.9, 0.98) and cfg.train.weight_decay == 0.02


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "run.yaml", """
        workload: retrieval
        train: {lr: 1.0e-4, max_steps: 10}
        data: {num_frames: 8}
    """)
    cfg = load_config(p, ["train.lr=5e-5", "data.root=s3://bucket/prefix", "model.preset=base"])
    assert cfg.workload == "retrieval"
    assert cfg.train.lr == 5e-5 and cfg.train.max_steps == 10
    assert cfg.data.num_frames == 8 and cfg.data.root == "s3://bucket/prefix"
    assert cfg.model.preset == "base"


def test_inherit_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 0.001, max_steps: 7}\ndata: {num_frames: 4}\n")
    p = write(tmp_path, "child.yaml", "inherit: base.yaml\ntrain: {max_steps: 9}\n")
    cfg = load_config(p)
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 9 and cfg.data.num_frames == 4


def test_unknown_key_names_key_source_and_suggestion(tmp_path):
    p = write(tmp_path, "bad.yaml", "train: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.lrr" in msg and str(p) in msg and "did you mean 'lr'" in msg


def test_bad_value_from_cli_names_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zero_stage=7"])
    msg = str(e.value)
    assert "train.zero_stage" in msg and "7" in msg and "command line" in msg and "0, 1, 2 or 3" in msg


@pytest.mark.parametrize("override,accepted", [("train.checkpoint_upload=later", "'async' or 'sync'"),
                                               ("data.next_epoch_batches=-1", "greater than or equal to 0")])
def test_issue_32_settings_refuse_bad_values_before_anything_starts(override, accepted):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert override.split("=")[0] in msg and "command line" in msg and accepted in msg, msg
    assert "***" not in msg  # a setting, not a secret: its value is shown


def test_bf16_on_cpu_is_rejected_with_fix():
    with pytest.raises(ConfigError, match="use_gpu=true"):
        load_config(None, ["train.precision=bf16"])


def test_bad_run_name():
    with pytest.raises(ConfigError, match="name"):
        load_config(None, ["name=a/b"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "broken.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_inherit_cycle(tmp_path):
    write(tmp_path, "a.yaml", "inherit: b.yaml\n")
    p = write(tmp_path, "b.yaml", "inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(p)


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=s3://x/y") == (["a"], "s3://x/y")
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-5", "data.num_frames=12"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p) == cfg


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": []}) == {"a.b": 1, "a.c.d": "x", "e": []}


@pytest.mark.parametrize("override", ["name=..", "name=.", "experiment=../../x", "experiment=..", "name=.hidden",
                                      "experiment=a/b", "name=-rf", "name=a\\b"])
def test_path_naming_values_cannot_leave_the_storage_root(override):
    """``name`` and ``experiment`` become folders of ``<storage>/<experiment>/<name>/`` (issue 16, item 5)."""
    with pytest.raises(ConfigError, match="folder name"):
        load_config(None, [override])


def test_ordinary_names_still_pass():
    cfg = load_config(None, ["name=retrieval-ft_2.1", "experiment=mplug2-retrieval"])
    assert cfg.name == "retrieval-ft_2.1" and cfg.experiment == "mplug2-retrieval"
