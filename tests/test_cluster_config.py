"""`scout cluster check`: Ray's own validation plus the lab's, before anyone waits on ssh."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray_scout import cluster
from ray_scout.cli import main

LAB = Path(__file__).resolve().parents[1] / "clusters" / "lab.yaml"


@pytest.fixture()
def lab() -> dict:
    return cluster.load(LAB)


def _replace(config: dict, key: str, old: str, new: str) -> dict:
    out = copy.deepcopy(config)
    out[key] = [c.replace(old, new) for c in out[key]]
    assert out[key] != config[key], f"{old!r} not found in {key}"
    return out


def test_shipped_lab_yaml_passes_and_reports_its_plan(lab):
    plan = cluster.check_lab(lab)
    assert plan.cloud_per_head == 1
    assert plan.edge_per_worker >= 1
    assert plan.metrics_export_port == 8080 and plan.dashboard_port == 8265
    assert len(plan.worker_ips) >= 1 and plan.head_ip not in plan.worker_ips


def test_cli_check_exits_zero_on_lab_yaml_and_two_on_a_broken_copy(lab, tmp_path, capsys):
    assert main(["cluster", "check", str(LAB)]) == 0
    broken = _replace(lab, "head_start_ray_commands", "--metrics-export-port=8080 ", "")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert main(["cluster", "check", str(path)]) == 2
    assert "--metrics-export-port" in capsys.readouterr().err


def test_ray_schema_errors_are_reported_with_their_place(lab):
    lab["auth"]["ssh_port"] = 2222  # not a field Ray's schema knows
    with pytest.raises(cluster.ClusterConfigError, match="auth"):
        cluster.check_lab(lab)


def test_per_node_resources_in_yaml_are_rejected_by_the_local_provider(lab):
    lab["available_node_types"] = {"cloud": {"resources": {"cloud": 1}, "node_config": {}}}
    lab["head_node_type"] = "cloud"
    with pytest.raises(cluster.ClusterConfigError, match="not supported for on-premise"):
        cluster.check_lab(lab)


@pytest.mark.parametrize("key,old,new,message", [
    ("head_start_ray_commands", """--resources='{"cloud": 1}'""", "", '"cloud": N'),
    ("head_start_ray_commands", '"cloud": 1', '"cloud": 0', "positive amount"),
    ("worker_start_ray_commands", """--resources='{"edge": 4}'""", """--resources='{edge: 4}'""",
     "not JSON"),
    ("worker_start_ray_commands", "$RAY_HEAD_IP:6379", "$RAY_HEAD_IP:6380", "--port"),
    ("head_start_ray_commands", "--disable-usage-stats", "", "usage-stats"),
    ("head_start_ray_commands", "--include-dashboard=true", "--include-dashboard=false",
     "dashboard must be on"),
    ("head_start_ray_commands", "RAY_enable_autoscaler_v2=0 ", "", "autoscaler v2"),
    ("head_start_ray_commands", "RAY_enable_autoscaler_v2=0", "RAY_enable_autoscaler_v2=1",
     "autoscaler v2"),
])
def test_lab_checks_name_the_missing_piece(lab, key, old, new, message):
    with pytest.raises(cluster.ClusterConfigError, match=message):
        cluster.check_lab(_replace(lab, key, old, new))


def test_every_problem_is_listed_at_once(lab):
    broken = _replace(lab, "head_start_ray_commands", "--disable-usage-stats", "")
    broken = _replace(broken, "worker_start_ray_commands", "--metrics-export-port=8080", "")
    with pytest.raises(cluster.ClusterConfigError) as err:
        cluster.check_lab(broken)
    assert "usage-stats" in str(err.value) and "--metrics-export-port" in str(err.value)


def test_ray_start_flags_honour_shell_quoting():
    flags = cluster.ray_start_flags(
        """ulimit -n 1024; ray start --head --port 6379 --resources='{"cloud": 1}'""")
    assert flags == {"--head": "true", "--port": "6379", "--resources": '{"cloud": 1}'}
    assert cluster.ray_start_flags("ray stop") is None


def test_environment_in_front_of_ray_start_is_read_apart_from_its_flags():
    line = "ray stop; A=1 B='x y' ray start --head --port=6379"
    assert cluster.ray_start_env(line) == {"A": "1", "B": "x y"}
    assert cluster.ray_start_flags(line) == {"--head": "true", "--port": "6379"}
    assert cluster.ray_start_env("A=1 ray stop") is None


def test_node_command_runs_ray_stop_as_ray_up_does(lab):
    argv = cluster.node_command(lab, "10.0.0.2", "ray stop")
    assert argv[0] == "ssh" and "root@10.0.0.2" in argv
    assert argv[argv.index("-i") + 1] == str(Path("~/.ssh/id_ed25519").expanduser())
    assert argv[-1] == "bash --login -c -i 'source ~/.bashrc; ray stop'"


def test_retarget_changes_only_addresses_key_and_ports(lab):
    out = cluster.retarget(lab, head_ip="127.0.0.1", worker_ips=["127.0.0.2"], ssh_user="root",
                           ssh_private_key="/k", head_ports={"--port": 7000,
                                                             "--metrics-export-port": 7001},
                           worker_ports={"--metrics-export-port": 7002})
    plan = cluster.check_lab(out)
    assert (plan.head_ip, plan.worker_ips, plan.gcs_port, plan.metrics_export_port) == (
        "127.0.0.1", ("127.0.0.2",), 7000, 7001)
    assert "$RAY_HEAD_IP:7000" in out["worker_start_ray_commands"][-1]
    assert "--metrics-export-port=7002" in out["worker_start_ray_commands"][-1]
    same = {k for k in lab if k not in ("provider", "auth", "head_start_ray_commands",
                                        "worker_start_ray_commands")}
    assert all(out[k] == lab[k] for k in same)
    assert out["setup_commands"] == lab["setup_commands"]
