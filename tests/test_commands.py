"""The console commands: every ``[project.scripts]`` entry resolves to a function, one installed script runs end to
end, and the shared error guard turns each user error into one sentence and exit 2 while a bug keeps its
traceback."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from pretrain_helpers import BIN, ROOT, env

from swinv2.commands import FILE_ERRORS, checkpoint_write_errors, run_command, typed_user_errors

SCRIPTS = {"swinv2-pretrain": "simmim.commands.pretrain:main", "swinv2-finetune": "swinv2.commands.finetune:main",
           "swinv2-evaluate": "swinv2.commands.evaluate:main", "swinv2-convert": "swinv2.commands.convert:main",
           "swinv2-make-shards": "swinv2.commands.make_shards:main", "swinv2-plan": "simmim.commands.plan:main"}


def test_every_script_entry_point_resolves_to_a_callable():
    found = {ep.name: ep for ep in importlib.metadata.distribution("swinv2-pretrain").entry_points
             if ep.group == "console_scripts"}
    assert {name: ep.value for name, ep in found.items()} == SCRIPTS
    for name, ep in found.items():
        assert callable(ep.load()), name
        assert (BIN / name).exists(), f"{name} is not installed: run pip install -e . again"


def test_each_launch_file_runs_its_command():
    """``launch/<x>.py`` runs the same function as its console script (``deepspeed launch/pretrain.py`` too)."""
    for name, target in SCRIPTS.items():
        module = target.split(":")[0]
        text = (ROOT / "launch" / f"{name.removeprefix('swinv2-').replace('-', '_')}.py").read_text()
        assert f"from {module} import main\n" in text and 'raise SystemExit(main())' in text, name


def test_an_installed_script_ends_a_user_error_in_one_sentence_and_exit_2(tmp_path):
    result = subprocess.run([str(BIN / "swinv2-make-shards"), str(tmp_path / "nope"), str(tmp_path / "s-%03d.tar"),
                             "--quiet"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"swinv2-make-shards: error: source {str(tmp_path / 'nope')!r} does not exist; give an image folder or a "
        "text/CSV file list."]


def test_pretrain_accepts_the_launchers_local_rank(capsys):
    from simmim.commands.pretrain import main

    assert main(["--local_rank=0", "--config", "missing.yaml"]) == 2
    assert capsys.readouterr().err == ("error: config file 'missing.yaml' does not exist: pass an existing --config "
                                       "YAML\n")


def _raise(error: BaseException):
    def command(argv: list[str] | None) -> int:
        raise error

    return command


@pytest.mark.parametrize("kind", [*typed_user_errors(), *FILE_ERRORS])
def test_the_guard_turns_a_user_error_into_one_sentence_and_exit_2(kind, capsys):
    user_errors = FILE_ERRORS if kind in FILE_ERRORS else None
    assert run_command(_raise(kind("the shard x.tar is missing: pass data.train_urls")), [],
                       user_errors=user_errors) == 2
    assert capsys.readouterr().err == "error: the shard x.tar is missing: pass data.train_urls\n"


def test_the_guard_names_the_program_and_reports_a_failed_write_with_exit_1(capsys):
    (write_error,) = checkpoint_write_errors()
    assert run_command(_raise(write_error("no room left on the disk")), [], prog="swinv2-pretrain") == 1
    assert capsys.readouterr().err == "swinv2-pretrain: error: no room left on the disk\n"


def test_the_guard_lets_bugs_and_usage_errors_through():
    with pytest.raises(ZeroDivisionError):
        run_command(lambda argv: 1 // 0, [])
    with pytest.raises(ValueError):  # a plain ValueError is a bug unless the command counts it as the user's
        run_command(_raise(ValueError("bug")), [])
    with pytest.raises(SystemExit):  # argparse's own usage errors keep their exit 2
        run_command(_raise(SystemExit(2)), [])


def test_a_bug_under_the_guard_ends_in_a_traceback_and_exit_1():
    code = ("from swinv2.commands import run_command\n"
            "raise SystemExit(run_command(lambda argv: 1 // 0, [], user_errors=(ValueError,), write_errors=()))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().endswith("ZeroDivisionError: integer division or "
                                                                           "modulo by zero")


def test_evaluate_names_its_own_option_for_empty_data(tmp_path, capsys):
    from swinv2.commands.evaluate import main

    assert main([str(tmp_path / "best.safetensors"), "--data", " "]) == 2
    assert capsys.readouterr().err == ("error: --data is empty: pass the evaluation shards, e.g. --data demo:val, a "
                                       "folder of shards or --data 'val-{0000..0063}.tar'\n")
