"""The shapes scripts' command lines: user errors end with one line and exit code 2, no traceback."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, argv, says", [
    ("bench_shapes", ["--tasks", "red2square"], "both words must be shapes"),
    ("bench_shapes", ["--model", "/nonexistent/model"], "/nonexistent/model"),
    ("eval_shapes", ["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_user_errors_exit_2_with_one_line(name, argv, says, tmp_path, capsys):
    code = _script(name).main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and says in err and "Traceback" not in err


def test_shape_confusion_counts_requested_against_judged():
    module = _script("eval_shapes")
    names = ("circle", "square", "triangle")
    confusion = module.shape_confusion([0, 0, 1, 2, 2, 2], [0, 1, 0, 2, 2, 0], names)
    assert confusion == {"circle": {"circle": 1, "square": 1, "triangle": 0},
                         "square": {"circle": 1, "square": 0, "triangle": 0},
                         "triangle": {"circle": 1, "square": 0, "triangle": 2}}
    md = module.confusion_table(confusion)
    assert md.splitlines()[-1] == "| triangle | 1 | 0 | 2 |" and len(md.splitlines()) == 5
