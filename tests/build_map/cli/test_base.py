"""What every command line shares: one error-to-exit wrapper, configs built from the options."""

from __future__ import annotations

import argparse

import pytest

from build_map.cli.base import ERROR_EXIT, INTERRUPTED_EXIT, config_from_args, config_help, run_command
from build_map.pipeline.build import BuildConfig
from build_map.sae.train_config import TrainConfig, TrainConfigError


def test_project_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    def refused():
        raise TrainConfigError("k must be between 1 and the number of latents (64); got k=65.")

    assert run_command(refused) == ERROR_EXIT
    assert capsys.readouterr().err == "error: k must be between 1 and the number of latents (64); got k=65.\n"
    assert run_command(refused, prefix="explore: error: ") == ERROR_EXIT
    assert capsys.readouterr().err.startswith("explore: error: k must be")

    def bug():
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        run_command(bug)


def test_ctrl_c_is_a_quiet_exit(capsys):
    def interrupted():
        raise KeyboardInterrupt

    assert run_command(interrupted) == INTERRUPTED_EXIT
    assert capsys.readouterr().err == "interrupted\n"


def test_configs_come_from_the_options_named_after_their_fields():
    args = argparse.Namespace(n_latents=64, k=4, seed=3, out="x", unrelated=True)
    cfg = config_from_args(TrainConfig, args, lr=1e-3)
    assert (cfg.n_latents, cfg.k, cfg.seed, cfg.lr) == (64, 4, 3, 1e-3)
    with pytest.raises(TrainConfigError, match="k must be between 1"):
        config_from_args(TrainConfig, argparse.Namespace(n_latents=4, k=8))


def test_help_of_an_off_flag_does_not_say_its_default():
    assert "default" not in config_help(BuildConfig, "overwrite")
    assert config_help(BuildConfig, "n_tokens").endswith("(default: 100000)")
