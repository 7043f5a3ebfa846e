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


@pytest.mark.parametrize("argv, says", [
    (["--t-focus", "1.5"], "in [0, 1]"),
    (["--t-focus", "0.5", "--t-focus-min", "900", "--t-focus-max", "500"], "min < max"),
    (["--t-focus", "0.5", "--t-focus-max", "1200"], "<= 1000"),
    (["--loc-weight", "-1"], ">= 0"),
    (["--loc-weight", "0.1", "--loc-t-max", "0"], "0 < max <= 1000"),
])
def test_train_refuses_an_empty_or_impossible_timestep_window(argv, says, tmp_path, capsys):
    train = _script("train_shapes")
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err
    # without a focus share the window is unused, so it is not checked
    assert train.parse_args(["--out", "run", "--t-focus-min", "900", "--t-focus-max", "500"]).t_focus == 0.0


def test_shape_confusion_counts_requested_against_judged():
    module = _script("eval_shapes")
    names = ("circle", "square", "triangle")
    confusion = module.shape_confusion([0, 0, 1, 2, 2, 2], [0, 1, 0, 2, 2, 0], names)
    assert confusion == {"circle": {"circle": 1, "square": 1, "triangle": 0},
                         "square": {"circle": 1, "square": 0, "triangle": 0},
                         "triangle": {"circle": 1, "square": 0, "triangle": 2}}
    md = module.confusion_table(confusion)
    assert md.splitlines()[-1] == "| triangle | 1 | 0 | 2 |" and len(md.splitlines()) == 5


def test_mcnemar_p_closed_forms():
    p = _script("eval_shapes").mcnemar_p
    assert p(0, 0) == 1.0 and p(2, 2) == 1.0
    assert p(5, 0) == pytest.approx(2 / 2**5) and p(0, 5) == pytest.approx(2 / 2**5)
    assert p(9, 1) == pytest.approx(2 * (1 + 10) / 2**10)
    assert p(29, 11) == pytest.approx(0.0064, abs=1e-4)  # the shipped model's 29 gained / 11 lost


def test_paired_change_counts_captions_that_turned_right_or_wrong():
    module = _script("eval_shapes")
    caps = ["a red circle on a blue background", "a green star on a white background",
            "a blue cross on a red background"]
    row = lambda c, shape, color, bg: {"caption": c, "shape": shape, "color": color, "background": bg}
    before = [row(caps[0], "circle", "red", "blue"), row(caps[1], "circle", "green", "white"),
              row(caps[2], "square", "blue", "red")]
    now = [row(caps[0], "square", "red", "blue"), row(caps[1], "star", "green", "white"),
           row(caps[2], "cross", "blue", "black")]
    change = module.paired_change(now, before)
    assert change["shape"] == {"before": 1 / 3, "now": 2 / 3, "gained": 2, "lost": 1, "p": 1.0}
    assert (change["background"]["gained"], change["background"]["lost"]) == (0, 1)
    assert (change["all"]["gained"], change["all"]["lost"], change["color"]["lost"]) == (1, 1, 0)
    assert module.change_table(change).splitlines()[2].startswith("| shape | 0.333 | 0.667 | 2 | 1 |")
    with pytest.raises(ValueError, match="different captions"):
        module.paired_change(now[:2], before)


def test_compare_with_an_eval_of_other_settings_is_a_clear_error(tmp_path, capsys):
    import json

    old = tmp_path / "eval.json"
    old.write_text(json.dumps({"n": 200, "seed": 0, "steps": 50, "guidance": 5.0, "model": "m",
                               "per_caption": [{"caption": "a red circle on a blue background"}]}))
    code = _script("eval_shapes").main(["--compare", str(old), "--n", "8", "--out", str(tmp_path / "o")])
    assert code == 2 and "pass the same --n" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # checked before any work
    (tmp_path / "bad.json").write_text("{")
    assert _script("eval_shapes").main(["--compare", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
