"""merge_lora.py's command line is argparse like the other tools (issue 26 item 5): every form
the README shows parses as before, and a command line that does not parse ends with exit
status 2 and argparse's message naming the bad argument, before any checkpoint is read."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, f"{REPO}/launch")  # for the script's `import _bootstrap`, only while importing it
try:
    from launch.merge_lora import main, parser
finally:
    sys.path.remove(f"{REPO}/launch")


@pytest.mark.parametrize("argv, paths, blend, accept", [
    (["runs/big-lora", "merged/"], ["runs/big-lora", "merged/"], False, False),
    (["runs/lora", "out", "--accept-base"], ["runs/lora", "out"], False, True),
    (["--accept-base", "runs/lora", "out"], ["runs/lora", "out"], False, True),
    (["--blend", "runs/a=0.5", "runs/b=0.5", "merged/"], ["runs/a=0.5", "runs/b=0.5", "merged/"], True, False),
    (["--blend", "runs/a=2", "runs/b=-1", "out", "--accept-base"], ["runs/a=2", "runs/b=-1", "out"], True, True),
])
def test_the_documented_forms_parse(argv, paths, blend, accept):
    args = parser().parse_intermixed_args(argv)
    assert (args.paths, args.blend, args.accept_base) == (paths, blend, accept)


@pytest.mark.parametrize("argv, named", [
    (["runs/lora", "out", "--accept"], "unrecognized arguments: --accept"),  # no abbreviations
    (["runs/lora", "out", "--force"], "unrecognized arguments: --force"),
    (["runs/lora"], "expected <adapter checkpoint> <out dir> (or --blend), got: runs/lora"),
    (["runs/a", "runs/b", "out"], "expected <adapter checkpoint> <out dir> (or --blend), got: runs/a runs/b "),
    (["--blend", "out"], "--blend needs at least one"),
    (["--blend", "runs/a=half", "out"], "argument --blend: 'runs/a=half' is not <adapter checkpoint>=<weight>"),
    (["--blend", "runs/a", "runs/b=0.5", "out"], "argument --blend: 'runs/a' is not"),
    (["--blend", "=0.5", "out"], "argument --blend: '=0.5' is not"),
    (["--blend", "runs/a=nan", "out"], "argument --blend: 'runs/a=nan' is not"),
])
def test_a_bad_command_line_exits_2_naming_the_argument(argv, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv[:-1], str(tmp_path / argv[-1])] if argv[-1] == "out" else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err, err
    assert not (tmp_path / "out").exists()


def test_the_script_exits_2_naming_an_unknown_flag_without_a_traceback(tmp_path):
    p = subprocess.run([sys.executable, "launch/merge_lora.py", "--blend", "runs/a=0.5", "runs/b=x", str(tmp_path / "o"),
                        "--accept-bse"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unrecognized arguments: --accept-bse" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "launch/merge_lora.py", "--blend", "runs/a=0.5", "runs/b=x", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "argument --blend: 'runs/b=x' is not" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()
