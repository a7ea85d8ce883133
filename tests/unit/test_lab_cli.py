"""`ambitctl` dispatch: every module in COMMAND_MODULES registers its subcommand; `lab` parses as documented."""

from __future__ import annotations

import pytest

from cli import ambitctl
from cli.lab import format_status


def test_lab_subcommands_parse() -> None:
    parser = ambitctl.build_parser()
    up = parser.parse_args(["lab", "up", "--dir", "examples/basic", "--name", "x1", "--mesh", "--drain-seconds", "2.5"])
    assert (up.dir, up.name, up.mesh, up.drain_seconds) == ("examples/basic", "x1", True, 2.5)
    assert parser.parse_args(["lab", "up"]).drain_seconds is None  # the lab's own default (AMBIT_DRAIN_SECONDS or 5)
    down = parser.parse_args(["lab", "down", "--all"])
    assert down.all and down.name is None
    ex = parser.parse_args(["lab", "exec", "demo/client", "--", "curl", "-s", "http://x/"])
    assert ex.target == "demo/client" and ex.cmd[-3:] == ["curl", "-s", "http://x/"]


def test_down_name_and_all_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        ambitctl.build_parser().parse_args(["lab", "down", "--all", "--name", "x"])


def test_every_listed_module_registers_a_command() -> None:
    parser = ambitctl.build_parser()
    for name in ambitctl.COMMAND_MODULES:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0


def test_status_table_marks_dead_processes_and_missing_netns() -> None:
    status = {
        "name": "ambit-0001",
        "phase": "up",
        "mesh": False,
        "config_dir": "/c",
        "source_dir": "/s",
        "state_dir": "/st",
        "core": {"netns": "ambit-0001-core", "ip": "10.1.0.254", "present": True},
        "nodes": [
            {
                "name": "n1",
                "ip": "10.1.0.1",
                "pod_cidr": "10.2.0.0/24",
                "uplink": "eth0",
                "netns": "a-n1",
                "present": False,
            }
        ],
        "pods": [],
        "processes": [
            {"name": "w", "role": "workload", "pid": 42, "alive": False, "netns": "a-p", "log": "/l/w.log"},
        ],
        "files": {},
    }
    text = format_status(status)
    assert "a-n1 (MISSING)" in text
    assert ["w", "workload", "42", "DEAD", "a-p", "/l/w.log"] in [line.split() for line in text.splitlines()]


def test_status_table_shows_both_families_of_a_dual_stack_lab() -> None:
    status = {
        "name": "ambit-0002",
        "phase": "up",
        "mesh": True,
        "config_dir": "/c",
        "source_dir": "/s",
        "state_dir": "/st",
        "core": {"netns": "ambit-0002-core", "ip": "10.1.0.254", "present": True},
        "nodes": [
            {
                "name": "n1",
                "ip": "10.1.0.1",
                "ip6": "fd00:1::1",
                "pod_cidr": "10.2.0.0/24",
                "pod_cidr6": "fd00:10:244:1::/64",
                "uplink": "eth0",
                "netns": "a-n1",
                "present": True,
            }
        ],
        "pods": [
            {
                "namespace": "demo",
                "name": "client",
                "node": "n1",
                "ip": "10.2.0.10",
                "ip6": "fd00:10:244:1::10",
                "service_account": "client",
                "host_veth": "vclient",
                "netns": "a-p",
                "present": True,
            }
        ],
        "processes": [],
        "files": {},
    }
    text = format_status(status)
    assert "10.1.0.1,fd00:1::1" in text and "10.2.0.0/24,fd00:10:244:1::/64" in text
    assert "10.2.0.10,fd00:10:244:1::10" in text
