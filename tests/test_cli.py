"""The ``padmoe`` command tree: every subcommand registers its own subparser, ``padmoe X --help`` exits 0 for each,
the deepspeed launcher's ``--local_rank`` and train's overrides and ``--resume`` parse, and the ``*_main`` entry
points and ``python -m pad_moe.deploy`` run the same registrations."""

import os
import subprocess
import sys

import pytest

from pad_moe.cli import build_parser, commands, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("train", "config", "presets", "count", "export", "consolidate", "reshard", "compress", "upcycle", "plan")


def _subparsers(parser):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_command_is_registered_with_a_handler():
    sub = _subparsers(build_parser())
    assert tuple(sub) == COMMANDS and len(commands()) == len(COMMANDS)
    for name, parser in sub.items():
        assert callable(parser.get_default("handler")), name
        assert parser.get_default("error_prog").startswith("padmoe"), name


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: padmoe {command}")


def test_launcher_local_rank_overrides_and_resume_parse():
    args = build_parser().parse_args(["--local_rank=1", "train", "configs/debug.yaml", "moe.ep_size=2",
                                      "train.steps=3", "--resume"])
    assert (args.command, args.config, args.overrides, args.resume) == ("train", "configs/debug.yaml",
                                                                       ["moe.ep_size=2", "train.steps=3"], True)
    args = build_parser().parse_args(["train", "--local_rank=0", "configs/debug.yaml"])
    assert args.overrides == [] and args.resume is False


def test_config_prints_the_resolved_config_and_takes_overrides_without_a_file(capsys):
    assert main(["config", "configs/debug.yaml", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["config", "moe.num_experts=2", "moe.ep_size=1"]) == 0  # no file: the defaults, then overrides
    assert "num_experts: 2" in capsys.readouterr().out


def test_main_functions_run_their_registration(capsys):
    from pad_moe.deploy import MAINS
    from pad_moe.plan import plan_main

    assert MAINS["count"](["debug", "--json"]) == 0
    assert '"name": "debug"' in capsys.readouterr().out
    assert plan_main(["switch-base-8", "--nodes", "0"]) == 2
    assert capsys.readouterr().err.strip() == "padmoe plan: error: --nodes=0 must be >= 1"
    for name, fn in MAINS.items():
        with pytest.raises(SystemExit) as exit_:
            fn(["--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: padmoe {name}")


def test_python_m_pad_moe_deploy_is_padmoe_restricted_to_deploy_commands():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pad_moe.deploy", "reshard", "x", "--ep", "2", "--world", "3",
                           "--out", "y"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == ("padmoe reshard: error: --ep 2 must divide --world 3 "
                                                           "(DeepSpeed forms expert-parallel groups of ep "
                                                           "consecutive ranks)"), proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["moe.mode=pad", "train.steps=5", "partition.warmup_steps=5"], "partition.warmup_steps=5 is not below"),
    (["train.ds_config=configs/nope.json"], "train.ds_config='configs/nope.json' does not exist"),
])
def test_config_applies_the_checks_train_makes_before_loading(overrides, message, capsys):
    """`padmoe config` passed these and `padmoe train` refused them only after the model had loaded."""
    assert main(["config", "configs/debug.yaml", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_command_modules_do_not_import_the_cli_back():
    """compress / plan / deploy commands imported run_command from pad_moe.cli, which imports them (a circle)."""
    code = ("import sys; import pad_moe.hfmoe.compress, pad_moe.plan.planner, pad_moe.deploy.count, "
            "pad_moe.deploy.export, pad_moe.deploy.reshard, pad_moe.deploy.consolidate; "
            "from pad_moe.hfmoe.compress import compress_main; "
            "print(compress_main(['/nonexistent', '--kappa', '0.5', '--calib', 'x', '--out', 'y']), "
            "'pad_moe.cli' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.split() == ["2", "False"], proc.stdout[-500:] + proc.stderr[-500:]
    from pad_moe import cli, commands

    assert cli.run_command is commands.run_command and cli.dispatch is commands.dispatch
