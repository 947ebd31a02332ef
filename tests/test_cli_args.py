"""Command-line parsing: key=value overrides may stand anywhere, other stray words are errors."""
import os

import pytest

from blindseg_dist.cli import _parse, build_parser


def test_overrides_anywhere_on_the_train_command_line():
    args = _parse(build_parser(), ["train", "--config", "demo", "optim.lr=0.02", "--resume", "--output-dir", "X",
                                   "data.batch_size=2", "--max-steps", "9", "run.threads=1"])
    assert args.overrides == ["optim.lr=0.02", "data.batch_size=2", "run.threads=1"]
    assert args.resume is True and args.output_dir == "X" and args.max_steps == 9


def test_a_stray_word_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(build_parser(), ["train", "--config", "demo", "optim.lr=0.02", "--max-steps", "9", "oops"])
    assert e.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a subcommand without overrides takes none
        _parse(build_parser(), ["flops", "--config", "demo", "--bogus"])


def test_a_command_that_returns_closes_its_process_group(tmp_path):
    """cli.main destroys the process group after a normal return (left to interpreter exit, gloo's
    threads can abort a finished rank), and dist.gloo_group tolerates a group already closed."""
    import torch.distributed as tdist

    from blindseg_dist import cli, dist
    from blindseg_dist.launcher import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    with dist.gloo_group(0, 1, 60):
        assert tdist.is_initialized()
        assert cli.main(["synth", str(tmp_path / "s"), "--domains", "1", "--images-per-domain", "1",
                         "--size", "32x64"]) == 0
        assert not tdist.is_initialized()
    assert not tdist.is_initialized()
