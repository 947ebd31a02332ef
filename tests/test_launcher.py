"""blindseg_dist.launcher: the accelerate command line for N CPU/GPU processes and its environment,
free ports, and the gloo process runner (real processes: 2 and 3 ranks)."""
import socket
import sys

import pytest
import torch

from blindseg_dist.launcher import blindseg_command, free_port, launch_env, run_gloo


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 1024 <= port < 65536


def test_one_process_is_the_plain_module_command():
    assert blindseg_command(["train", "--config", "c.yaml"]) == [sys.executable, "-m", "blindseg_dist", "train",
                                                                  "--config", "c.yaml"]


def test_n_processes_go_through_accelerate_multi_gpu():
    cmd = blindseg_command(["eval", "--json", "x.json"], processes=3, port=29555)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    opts = cmd[3:cmd.index("-m", 3)]
    assert opts[opts.index("--main_process_port") + 1] == "29555"
    assert opts[opts.index("--num_processes") + 1] == "3" and opts[opts.index("--num_machines") + 1] == "1"
    assert "--multi_gpu" in opts and "--cpu" not in opts  # --cpu would start one process
    assert "--machine_rank" not in opts
    assert cmd[cmd.index("-m", 3):] == ["-m", "blindseg_dist", "eval", "--json", "x.json"]


def test_several_machines_and_config_files():
    cmd = blindseg_command(["train"], processes=4, machines=2, machine_rank=1, main_ip="10.0.0.1", port=1234)
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--num_machines") + 1] == "2"
    cmd = blindseg_command(["train"], config_file="launch/accelerate/deepspeed_zero2.yaml")
    assert cmd[cmd.index("--config_file") + 1] == "launch/accelerate/deepspeed_zero2.yaml"
    assert "--multi_gpu" not in cmd and "--num_processes" not in cmd  # the YAML sets them
    with pytest.raises(ValueError, match="processes"):
        blindseg_command(["train"], processes=0)


def test_launch_env_cpu_mode():
    env = launch_env(cpu=True, base={"PATH": "/bin"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1", "ACCELERATE_USE_CPU": "1"}
    assert "ACCELERATE_USE_CPU" not in launch_env(cpu=False, base={})
    assert launch_env(cpu=True, base={"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"  # the caller's wins
    assert ("ACCELERATE_USE_CPU" in launch_env(base={})) == (not torch.cuda.is_available())


def _all_reduce(rank, world, scale):
    from blindseg_dist import dist

    t = dist.all_reduce_sum(torch.tensor([float(rank + 1)]), tag="test")
    return {"rank": dist.rank(), "world": dist.world_size(), "sum": float(t) * scale}


def _fail_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


@pytest.mark.parametrize("world", [2, 3])
def test_run_gloo_collects_results_in_rank_order(world):
    res = run_gloo(_all_reduce, world, 10.0, timeout=120)
    assert [r["rank"] for r in res] == list(range(world)) and {r["world"] for r in res} == {world}
    assert {r["sum"] for r in res} == {10.0 * world * (world + 1) / 2}


def test_run_gloo_raises_with_the_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank one refuses"):
        run_gloo(_fail_on_rank_one, 2, timeout=120)


def test_blindseg_launcher_and_run_exit_codes():
    from blindseg_dist.launcher import run_exit_code

    cmd = blindseg_command(["train"], processes=2, port=1234, launcher="blindseg")
    assert cmd[1:4] == ["-m", "blindseg_dist.launcher", "--main_process_port"]
    with pytest.raises(ValueError, match="launcher must be one of"):
        blindseg_command(["train"], processes=2, launcher="torchrun")
    # the most telling rank code: config error, non-finite, an error, a dead/hung peer; else 128 + signal
    assert run_exit_code([0, 0]) == 0
    assert run_exit_code([4, 1]) == 1 and run_exit_code([1, 2]) == 2 and run_exit_code([4, 3]) == 3
    assert run_exit_code([-9, 4]) == 4  # a killed rank, the survivor's collective failed
    assert run_exit_code([-9]) == 137 and run_exit_code([17, 0]) == 17
