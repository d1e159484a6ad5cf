"""The job spec: the init template, every kind of bad input, overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stalwart.job.scaffold import write_job_yaml
from stalwart.job.spec import RUNGS, JobSpec, SpecError, apply_overrides, load_spec, parse_spec

BASE = {"apiVersion": "stalwart.dev/v1", "name": "demo", "script": "train.py"}


def _problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.problems)


def test_init_writes_a_file_that_validates_and_documents_every_field(tmp_path: Path) -> None:
    path = write_job_yaml(tmp_path, name="demo")
    spec = load_spec(path)
    assert spec.name == "demo"
    text = path.read_text()
    for field in JobSpec.model_fields.values():
        key = field.alias or next(k for k, v in JobSpec.model_fields.items() if v is field)
        assert f"\n{key}:" in text, key
    with pytest.raises(Exception, match="already exists"):
        write_job_yaml(tmp_path, name="demo")


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"nodez": 2}, "nodez", "unknown field"),
        ({"nproc_per_node": "two"}, "nproc_per_node", "valid integer"),
        ({"nodes": "4:2"}, "nodes", "below min"),
        ({"nodes": "x"}, "nodes", "MIN:MAX"),
        ({"nproc_per_node": 8, "resources": {"gpus": 4}}, "nproc_per_node", "resources.gpus is 4"),
        (
            {
                "volumes": [
                    {"name": "a", "mount_path": "/d", "pvc": "c"},
                    {"name": "b", "mount_path": "/d/", "pvc": "c"},
                ]
            },
            "volumes[1].mount_path",
            "already mounted",
        ),
        ({"volumes": [{"name": "a", "mount_path": "/d"}]}, "volumes[0]", "exactly one of host_path or pvc"),
        ({"script": None}, "script", "valid string"),
        ({"backend": "kubernetes"}, "image", "required for the kubernetes backend"),
        ({"name": "My_Job"}, "name", "not a valid job name"),
        ({"name": "1job"}, "name", "starting with a letter"),  # Services (the store's) need one
        ({"name": "x" * 41}, "name", "longer than 40"),
        ({"env": {"1BAD": "x"}}, "env", "1BAD"),
        ({"fault": "explode:rank=1"}, "fault", "unknown kind"),
        (
            {"health": {"log_rules": [{"name": "r", "log_pattern": "(("}]}},
            "health.log_rules[0].log_pattern",
            "regular",
        ),
        ({"restart": {"ladder": ["exit", "restart_workers"]}}, "restart.ladder", "ladder order"),
        (
            {"restart": {"ladder": ["in_process", "restart_workers", "exit"]}},
            "restart.ladder",
            "not available",
        ),
        ({"kubernetes": {"flavour": "slurm"}}, "kubernetes.flavour", "must be one of"),
        ({"checkpoint": {"mirrors": ["s3://b/run"]}}, "checkpoint", "mirrors need a uri"),
        ({"checkpoint": {"uri": "/ck", "mirrors": ["/ck"]}}, "checkpoint", "repeat a location"),
        ({"checkpoint": {"uri": "/ck", "mirrors": ["s3://b/a,b"]}}, "checkpoint", "without commas"),
        ({"resources": {"memory": "12 GB"}}, "resources.memory", "quantity"),
    ],
)
def test_bad_input_names_the_field_and_the_problem(change: dict[str, Any], field: str, words: str) -> None:
    problems = _problems({**BASE, **change})
    assert field in problems, problems
    assert words in problems[field]


def test_missing_script_and_wrong_version_are_reported() -> None:
    data = dict(BASE)
    del data["script"]
    assert _problems(data) == {"script": "required field is missing"}
    assert "unsupported version" in _problems({**BASE, "apiVersion": "stalwart.dev/v9"})["apiVersion"]


def test_every_problem_is_reported_at_once() -> None:
    problems = _problems({**BASE, "name": "BAD", "nodes": "3:1", "typo": 1, "nproc_per_node": 0})
    assert set(problems) == {"name", "nodes", "typo", "nproc_per_node"}


def test_a_file_that_is_not_a_mapping_or_not_yaml_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    (tmp_path / "b.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(tmp_path / "a.yaml")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "b.yaml")
    with pytest.raises(Exception, match="no such job spec"):
        load_spec(tmp_path / "missing.yaml")


def test_node_ranges_stay_ranges_in_files_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE) + "nodes: 2:4\n")  # unquoted: YAML 1.1 would read 124
    spec = load_spec(path)
    assert (spec.nodes.min, spec.nodes.max) == (2, 4)
    spec = load_spec(path, ["nodes=1:8", "env.FOO=007", "args=[--lr, '0.1']", "resources.gpus=2"])
    assert (spec.nodes.min, spec.nodes.max) == (1, 8)
    assert spec.env == {"FOO": "007"}
    assert spec.args == ("--lr", "0.1")
    assert spec.resources.gpus == 2


def test_overrides_address_list_items_and_reject_malformed_items() -> None:
    data = {**BASE, "volumes": [{"name": "a", "mount_path": "/a", "pvc": "c"}]}
    out = apply_overrides(data, ["volumes.0.mount_path=/b", "scheduling.node_selector.pool=gpu"])
    assert out["volumes"][0]["mount_path"] == "/b"
    assert out["scheduling"] == {"node_selector": {"pool": "gpu"}}
    assert data["volumes"][0]["mount_path"] == "/a"  # the input is not modified
    with pytest.raises(SpecError, match="FIELD=VALUE"):
        apply_overrides(data, ["nodes"])
    with pytest.raises(SpecError, match="not a mapping"):
        apply_overrides(data, ["name.first=x"])
    with pytest.raises(SpecError, match="there is no item 3: the list has 1"):
        apply_overrides(data, ["volumes.3.name=x"])  # an IndexError traceback before
    with pytest.raises(SpecError, match=r"there is no item 5: the list has 1 \(add item 1\)"):
        apply_overrides(data, ["volumes.5=x"])
    appended = apply_overrides(data, ["volumes.1={name: b, mount_path: /c, pvc: d}"])
    assert [v["name"] for v in appended["volumes"]] == ["a", "b"]


def test_the_ladder_rungs_are_the_agents_rungs() -> None:
    from stalwart.agent.policy import Rung

    assert set(RUNGS) == {r.value for r in Rung}
