"""bench/gpu_check.py: the dry run that checks the GPU procedure on CPU, and the step runner going on after a failing
step and a step that overruns its time box."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module; the bench/ folder it puts on sys.path (for bench/common.py) is taken off again."""
    path, modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location("_test_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name == "common" or name.startswith("_gpu_check_bench_"):
            del sys.modules[name]
    yield module
    sys.modules.pop(spec.name, None)


def test_dry_run_checks_every_planned_step(tmp_path, gpu_check):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout
    assert done.returncode == 0, output[-4000:] + done.stderr[-4000:]
    last = output.strip().splitlines()[-1]
    match = re.fullmatch(r"estimated total: (\d+) s", last)
    assert match, last
    assert int(match.group(1)) <= 540
    names = [step.name for step in gpu_check.main_plan(tmp_path, tmp_path, None)]
    assert {"env", "cotracker3_checkpoint", "train_public", "train_fast", "tracker", "kernels", "attention",
            "track_store", "pytest_gpu"} <= set(names)
    for name in names:  # in the plan, and checked (or a planned skip) on CPU
        assert re.search(rf"^  {name}\s+\d+ s", output, re.M), name
        assert re.search(rf"^  (ok|skip)\s+{name}:", output, re.M), name
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [entry["step"] for entry in plan] == names


def test_failing_and_overrunning_steps_do_not_stop_the_run(tmp_path, gpu_check):
    Step = gpu_check.Step
    result = tmp_path / "raw" / "last.json"
    result.parent.mkdir()
    steps = [
        Step("fails", "exits 1", ["-c", "import sys; print('boom'); sys.exit(1)"], 30),
        Step("hangs", "sleeps past its box", ["-c", "import time; time.sleep(5)"], 1),
        Step("dependent", "needs the failed step", ["-c", "pass"], 30, needs=("fails",)),
        Step("planned_skip", "not there yet", ["-c", "pass"], 30, skip="does not exist yet"),
        Step("last", "writes its result", ["-c", "import json, sys; json.dump({'x': 3}, open(sys.argv[1], 'w'))",
                                           str(result)], 30, result=result,
             keys=lambda r: (f"x is {r['x']}", {"x": r["x"]})),
    ]
    out = tmp_path / "out"
    started = time.monotonic()
    records = {r["step"]: r for r in gpu_check.run_plan(steps, out, echo=lambda line: None)}
    assert time.monotonic() - started < 20  # the sleeper was killed at its 1 s box, not waited for
    assert records["fails"]["status"] == "failed" and records["fails"]["returncode"] == 1
    assert records["hangs"]["status"] == "timeout" and records["hangs"]["seconds"] < 4.9
    assert records["dependent"]["status"] == "skipped" and "fails" in records["dependent"]["reason"]
    assert records["planned_skip"]["status"] == "skipped"
    assert records["last"]["status"] == "ok" and records["last"]["results"] == {"x": 3}
    assert records["last"]["numbers"] == {"x": 3}
    assert "boom" in (out / "fails.log").read_text()
    assert "killed after its time box" in (out / "hangs.log").read_text()
    for name, record in records.items():
        assert json.loads((out / f"{name}.json").read_text())["status"] == record["status"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["failed", "timeout", "skipped", "skipped", "ok"]
    table = (out / "summary.md").read_text()
    for name, status in [("fails", "failed"), ("hangs", "timeout"), ("dependent", "skipped"), ("last", "ok")]:
        assert re.search(rf"^\| {name} \| {status} \|", table, re.M), table
    assert "x is 3" in table


def test_pack_leaves_two_summaries_and_one_bundle(tmp_path, gpu_check):
    Step = gpu_check.Step
    steps = [Step("one", "prints", ["-c", "print(1)"], 30), Step("two", "fails", ["-c", "raise SystemExit(2)"], 30)]
    out = tmp_path / "out"
    gpu_check.run_plan(steps, out, work=tmp_path / "work", pack=True, meta={"tag": "h200"}, echo=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_h200.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "gpu_check_h200.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["one.json", "one.log", "two.json", "two.log"]
