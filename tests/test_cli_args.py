"""Command-line parsing: key=value overrides may stand anywhere, other stray words are errors."""
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
