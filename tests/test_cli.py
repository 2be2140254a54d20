"""``ssljax <command> --help``: usage, the flags and where the config keys are documented,
exit code 0, whether called as a function or as the installed process."""

import os
import subprocess
import sys

import pytest

from ssljax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv", [["train", "--help"], ["train", "-h"],
                                  ["train", "--config", "configs/simclr.py", "--help"],
                                  ["help", "train"]])
def test_train_help_names_flags_and_where_keys_are_documented(argv, capsys):
  assert cli.main(["ssljax", *argv]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: ssljax train")
  for flag in ("--config FILE[:ARG]", "--workdir DIR", "--config.KEY=VALUE", "--log_level",
               "--help"):
    assert flag in out, flag
  config_py = os.path.join(ROOT, "ssljax", "config.py")
  assert config_py in out and os.path.exists(config_py)
  assert "config.json" in out and "exit codes" in out


@pytest.mark.parametrize("argv", [["eval", "--help"], ["eval", "-h"], ["help", "eval"],
                                  ["eval", "--workdir", "/nonexistent", "--help"]])
def test_eval_help_needs_no_workdir(argv, capsys):
  assert cli.main(["ssljax", *argv]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: ssljax eval")
  for flag in ("--workdir DIR", "--config.KEY=VALUE", "--log_level", "--help"):
    assert flag in out, flag
  assert os.path.join(ROOT, "ssljax", "config.py") in out


def test_help_after_a_double_dash_is_not_a_request_for_help():
  with pytest.raises(SystemExit, match="--workdir is required"):
    cli.main(["ssljax", "eval", "--", "--help"])


@pytest.mark.parametrize("argv", [["analyze", "--help"], ["help", "analyze"]])
def test_analyze_help_lists_flags_and_every_analysis_key(argv, capsys):
  from ssljax.analysis.analyze import default_analysis_config
  assert cli.main(["ssljax", *argv]) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: ssljax analyze --workdir DIR")
  for flag in ("--workdir", "--out", "--log_level", "--help"):
    assert flag in out, flag
  for key, value in default_analysis_config().items():
    assert f"  {key} = {value!r}\n" in out, key
  assert os.path.join(ROOT, "ssljax", "analysis", "analyze.py") in out


def test_analyze_without_workdir_is_exit_1(capsys):
  assert cli.main(["ssljax", "analyze"]) == 1
  assert "--workdir" in capsys.readouterr().err


def test_top_level_help_points_to_the_commands_help(capsys):
  assert cli.main(["ssljax", "--help"]) == 0
  out = capsys.readouterr().out
  assert "ssljax <command> --help" in out
  assert "ssljax train --config configs/simclr.py:fashion_mnist --workdir runs/simclr \\\n" in out


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_as_a_process_exits_0_quickly_without_jax(command):
  # The console script's entry point is cli.main; `python -m ssljax.cli` runs the same code.
  code = ("import sys; from ssljax import cli; rc = cli.main(['ssljax', %r, '--help']); "
          "assert 'jax' not in sys.modules, 'help imported jax'; sys.exit(rc)" % command)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"usage: ssljax {command}")


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_help_text_is_wrapped_and_paths_stand_on_their_own_lines(command):
  # Each documented file is printed on a line of its own (its absolute path varies in
  # length); every other line fits a 95-column terminal, as the rest of the help is wrapped.
  lines = cli.COMMAND_HELP[command].splitlines()
  too_long = [line for line in lines if len(line) > 95 and cli._HERE not in line]
  assert not too_long, too_long
  path_lines = [line.strip() for line in lines if cli._HERE in line]
  assert path_lines == [os.path.join(cli._HERE, "config.py"),
                        os.path.join(cli._HERE, "methods", "<name>.py"),
                        os.path.join(cli._HERE, "configs", "<method>.py")]


def test_cpu_defaults_give_openblas_one_thread_unless_the_user_chose(monkeypatch):
  # LAPACK calls inside a compiled step (UOTA's Cholesky) must not start OpenBLAS's spinning
  # thread pool next to XLA's; a value the user exported wins, as for XLA_FLAGS.
  from ssljax import cli
  monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  cli.set_cpu_defaults()
  assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
  assert os.environ["XLA_FLAGS"] == cli.CPU_XLA_FLAGS
  monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  cli.set_cpu_defaults()
  assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"


def test_importing_the_cli_loads_no_blas_before_the_defaults_are_set():
  # The defaults only take effect if NumPy/SciPy/JAX (and so OpenBLAS) load after them.
  code = ("import sys, ssljax.cli; "
          "print(sorted(m for m in ('numpy', 'scipy', 'jax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_info_lines_show_even_when_reading_the_workdir_logs_first(tmp_path):
  # `ssljax eval` reads the workdir's config while parsing its flags; a root-logger call there
  # used to install a WARNING handler first and hide every INFO line of a long evaluation.
  code = ("import logging, sys\n"
          "from ssljax import cli\n"
          "def parse(argv, command):\n"
          "  logging.warning('reading the workdir')\n"
          "  logging.getLogger('ssljax.eval').info('evaluation step 1')\n"
          "  sys.exit(3)\n"
          "cli._parse = parse\n"
          "cli.main(['ssljax', 'eval', '--workdir', 'w'])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
  assert result.returncode == 3, result.stderr
  assert "INFO ssljax.eval: evaluation step 1" in result.stderr
  quiet = subprocess.run([sys.executable, "-c", code.replace("'w']", "'w', '--log_level',"
                                                                      " 'WARNING']")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert "reading the workdir" in quiet.stderr and "evaluation step 1" not in quiet.stderr


def test_a_failed_evaluation_after_the_others_exits_1_naming_it(monkeypatch, tmp_path, capsys):
  from ssljax.train import loop
  monkeypatch.setattr(cli, "_parse", lambda argv, command: type(
      "Flags", (), {"log_level": "INFO", "config": None, "workdir": str(tmp_path),
                    "distributed": False, "coordinator_address": None,
                    "num_processes": None, "process_id": None,
                    "distributed_timeout": None, "local_device_ids": None})())
  monkeypatch.setattr(cli, "_start_distributed", lambda fv, command: None)
  monkeypatch.setattr(loop, "evaluate_workdir", lambda workdir, config: {
      "knn/top1": 0.5, "linear_eval/error": "the loss is not finite by step 8"})
  assert cli.main(["ssljax", "eval", "--workdir", str(tmp_path)]) == 1
  captured = capsys.readouterr()
  assert '"knn/top1": 0.5' in captured.out
  assert "ssljax eval: linear_eval failed: the loss is not finite by step 8" in captured.err
