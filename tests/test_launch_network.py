"""launch/network.py on this machine's real interfaces, and `catdog-launch local`'s several-machine flags.

Jobs that really span two nodes (two network namespaces): tests/test_launch_two_nodes.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from launch.network import NetworkError, interface_of, plan, resolve
from train.config import ConfigError
from train.config_io import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG_CPU = ROOT / "configs" / "debug_cpu.yaml"


def a_network_address() -> tuple[str, str]:
    """(interface, IPv4 address) of an interface of this machine that is up, loopback aside."""
    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127.") and stats.get(name, None):
                if stats[name].isup:
                    return name, a.address
    pytest.skip("this machine has no network interface up besides loopback")


def test_one_node_gives_torch_an_address_and_leaves_the_interfaces_alone():
    p = plan("localhost", is_master=True, nodes=1)
    env: dict[str, str] = {}
    line = p.apply(env)
    assert p.master_addr == resolve("localhost") and env == {"MASTER_ADDR": p.master_addr}
    assert "one node: the interfaces are left to torch" in line


def test_the_main_node_whose_name_is_loopback_uses_its_address_on_the_route_to_another_node():
    # The job's first node is named "localhost" here (loopback, as a Debian node's own name is); another node of
    # the job is at one of this machine's addresses, so the route to it leaves through that address.
    ifname, addr = a_network_address()
    p = plan("localhost", is_master=True, peers=["localhost", addr], nodes=2)
    assert (p.master_addr, p.ifname) == (addr, ifname) and interface_of(addr) == ifname
    env = {"GLOO_SOCKET_IFNAME": "ib0"}  # the user's value always wins
    line = p.apply(env)
    assert env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": ifname, "MASTER_ADDR": addr}
    assert "GLOO_SOCKET_IFNAME=ib0 (yours)" in line and f"NCCL_SOCKET_IFNAME={ifname} (routes to the master" in line
    assert "here its name resolves to loopback" in line


def test_a_master_that_is_loopback_on_another_node_is_a_clear_error():
    with pytest.raises(NetworkError, match=r"the master node localhost resolves to the loopback address .* Fix the"):
        plan("localhost", is_master=False, peers=["localhost", "x"], nodes=2)
    with pytest.raises(NetworkError, match="cannot resolve 'no-such-node.invalid'"):
        plan("no-such-node.invalid", is_master=False, nodes=2)


def launch_local(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch", "local", "--config", str(DEBUG_CPU), "--dry-run", *argv, "data.dir=/d"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_local_launch_on_several_machines_passes_accelerates_flags():
    ifname, addr = a_network_address()
    res = launch_local("--cpu-ranks", "2", "--num-machines", "2", "--machine-rank", "0", "--main-process-ip", addr,
                       "--port", "29555")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"machine 0 of 2: network: MASTER_ADDR={addr} ({addr}); GLOO_SOCKET_IFNAME={ifname} (routes" in res.stderr
    # 2 ranks here and 2 on the other machine: accelerate counts all of them.
    assert "--num_machines 2 " in res.stdout and "--multi_gpu --num_processes 4 --main_process_port 29555" in res.stdout
    assert f"--machine_rank 0 --main_process_ip {addr} --same_network -m train" in res.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-machines", "2", "--main-process-ip", "10.0.0.1"], "--num-machines 2: pass --port"),
        (["--num-machines", "2", "--port", "29555"], "--num-machines 2: pass --main-process-ip"),
        (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "x", "--port", "1"], "use 0 .. 1"),
        (["--num-machines", "2", "--machine-rank", "1", "--main-process-ip", "localhost", "--port", "1"],
         "the master node localhost resolves to the loopback address"),
    ],
)  # fmt: skip
def test_bad_several_machine_settings_are_one_line_and_exit_2(argv: list[str], message: str):
    res = launch_local(*argv)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_dist_timeout_is_a_positive_number_of_seconds(tmp_path: Path):
    cfg = load_config(DEBUG_CPU, ["data.dir=/d"])
    assert cfg.train.dist_timeout_s == 600
    with pytest.raises(ConfigError, match=r"train.dist_timeout_s=0.0: use a number of seconds > 0"):
        load_config(DEBUG_CPU, ["data.dir=/d", "train.dist_timeout_s=0"])
