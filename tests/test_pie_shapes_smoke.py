"""CI smoke run of ``scripts/bench_pie_shapes.py``: PIE-Bench in (the shapes world's mapping file),
translate's dataset mode for two methods x {DDIM, Direct} inversion, PIE-Bench's evaluator out."""

import importlib.util
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("bench_pie_shapes", os.path.join(ROOT, "scripts", "bench_pie_shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pie_shapes_smoke_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "pie"
    rc = _script().main(["--per-task", "1", "--tasks", "red2blue,circle2square", "--steps", "3",
                         "--methods", "ddim,p2p", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "pie_shapes.json").read_text())
    rows = {(r["method"], r["inversion"]): r for r in report["rows"]}
    assert set(rows) == {(m, i) for m in ("ddim", "p2p") for i in ("DDIM", "Direct")}
    for r in rows.values():
        assert r["n"] == 2 and r["failed"] == 0
        assert all(math.isfinite(r[k]) for k in ("psnr", "mse", "ssim", "target_acc"))
        assert 0 < r["ssim"] <= 100 and r["mse"] > 0
    # Direct Inversion changes only the source branch: plain DDIM's edit (no source branch to follow) is
    # untouched, while P2P's (whose edit reads its source branch) is not
    assert rows[("ddim", "DDIM")]["mse"] == rows[("ddim", "Direct")]["mse"]
    assert rows[("p2p", "DDIM")]["mse"] != rows[("p2p", "Direct")]["mse"]
    table = (out / "pie_shapes.md").read_text()
    assert "| p2p | Direct |" in table and "PSNR" in table and "target acc." in table
    mapping = json.loads((out / "data" / "mapping_file.json").read_text())
    results = [json.loads(l) for l in (out / "runs" / "p2p+direct" / "results.jsonl").read_text().splitlines() if l]
    assert {r["id"] for r in results} == set(mapping) and all(r["editing_type_id"] in ("1", "6") for r in results)
