"""Allocator defaults set before torch is imported (blindseg_dist/runtime_env.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blindseg_dist import runtime_env
from blindseg_dist.launcher import launch_env


def test_defaults_fill_unset_keys_and_keep_the_users_value():
    env = runtime_env.apply_defaults({})
    assert env == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert runtime_env.apply_defaults({"THP_MEM_ALLOC_ENABLE": "0"})["THP_MEM_ALLOC_ENABLE"] == "0"
    assert launch_env(cpu=True, base={})["THP_MEM_ALLOC_ENABLE"] == "1"
    assert launch_env(cpu=True, base={"THP_MEM_ALLOC_ENABLE": "0"})["THP_MEM_ALLOC_ENABLE"] == "0"


def test_the_cli_sets_them_before_torch_is_imported():
    # torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation: the CLI module must not
    # import torch, and main() must set the variable before its subcommand does
    code = ("import os, sys\n"
            "os.environ.pop('THP_MEM_ALLOC_ENABLE', None)\n"
            "import blindseg_dist.cli as cli\n"
            "assert 'torch' not in sys.modules, 'importing the CLI imported torch'\n"
            "seen = {}\n"
            "cli.build_parser = lambda f=cli.build_parser: (seen.update(torch='torch' in sys.modules,"
            " thp=os.environ.get('THP_MEM_ALLOC_ENABLE')), f())[1]\n"
            "try:\n"
            "    cli.main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(seen)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "{'torch': False, 'thp': '1'}"


def _thp_mode() -> str:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = p.read_text() if p.exists() else ""
    return text[text.find("[") + 1: text.find("]")] if "[" in text else "absent"


FAULTS = ("import json, resource, torch\n"
          "n = 80 * 2**20 // 4\n"
          "x = torch.empty(n); x.fill_(1); del x\n"
          "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "for _ in range(5):\n"
          "    x = torch.empty(n); x.fill_(1); del x\n"
          "print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f) / 5))\n")


@pytest.mark.skipif(_thp_mode() != "madvise",
                    reason=f"the kernel's transparent huge pages are {_thp_mode()!r}, not 'madvise': "
                           "the setting cannot change the fault count here")
def test_the_setting_cuts_the_page_faults_of_a_large_buffer():
    def faults(value: str) -> float:
        env = runtime_env.apply_defaults({**launch_env(cpu=True), "THP_MEM_ALLOC_ENABLE": value})
        out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    off, on = faults("0"), faults("1")
    # 80 MB in 4 KB pages is 20480 faults when glibc returns the buffer to the kernel on free
    assert on * 4 < off, (on, off)
