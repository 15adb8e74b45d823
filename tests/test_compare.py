"""The comparison command: its statistics against scipy and a brute-force pairing, and the small CI version end to
end (two seeds, baselines, pixel-only and TrackMAE with exact tracks), resumable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from trackmae_stream.compare import BASELINE, aggregate, main, method_arms, t_interval


@pytest.mark.parametrize("n", [2, 3, 5, 11])
def test_t_interval_matches_scipy(n):
    rng = np.random.default_rng(n)
    values = list(rng.uniform(0.1, 0.9, size=n))
    mean, lo, hi = t_interval(values)
    ref = stats.t.interval(0.95, n - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(ref, rel=1e-6)


def test_paired_differences_are_taken_seed_by_seed():
    rng = np.random.default_rng(3)
    runs = []
    for seed in (4, 1, 7):  # unordered on purpose
        for arm in (BASELINE, "other"):
            runs.append({"arm": arm, "seed": seed, "linear": float(rng.uniform()), "knn": float(rng.uniform()),
                         "num_val": 37})
    table = aggregate(runs)
    by = {(r["arm"], r["seed"]): r for r in runs}
    diffs = [by["other", s]["linear"] - by[BASELINE, s]["linear"] for s in (1, 4, 7)]
    got = table["other"]["linear"][f"minus_{BASELINE}"]
    assert got["values"] == pytest.approx(diffs)
    assert got["ci95"] == pytest.approx(list(stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))))
    assert f"minus_{BASELINE}" not in table[BASELINE]["linear"]


def test_track_reading_methods_get_one_arm_per_tracker_and_missing_presets_are_listed(monkeypatch):
    from trackmae_stream import compare

    arms, skipped = method_arms(["videomae", "trackmae", "trackmae_raw_motion"], ["synthetic_gt", "lucas-kanade"])
    assert set(arms) == {"videomae", "trackmae[synthetic_gt]", "trackmae[lucas-kanade]",
                         "trackmae_raw_motion[synthetic_gt]", "trackmae_raw_motion[lucas-kanade]"}
    assert arms["trackmae[lucas-kanade]"] == ("trackmae", ["tracker.backend=lucas-kanade"])
    assert arms["trackmae_raw_motion[synthetic_gt]"] == ("trackmae", ["target.track_motion.norm=none",
                                                                      "tracker.backend=synthetic_gt"])
    assert arms["videomae"] == ("videomae", []) and not skipped
    monkeypatch.setitem(compare.METHODS, "future", compare.Method("no_such_preset", tracks=False))
    arms, skipped = method_arms(["videomae", "future"], ["synthetic_gt"])
    assert set(arms) == {"videomae"} and skipped and "no_such_preset.yaml" in skipped[0]
    with pytest.raises(Exception, match="unknown method"):
        method_arms(["nonsense"], ["synthetic_gt"])


def test_ci_comparison_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--budget", "ci", "--seeds", "0", "1", "--methods", "videomae", "trackmae",
            "--trackers", "synthetic_gt"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"random_init", "supervised", "videomae", "trackmae[synthetic_gt]"}
    for row in arms.values():
        assert row["seeds"] == [0, 1]
        for metric in ("linear", "knn"):
            lo, hi = row[metric]["ci95"]
            assert 0.0 <= min(row[metric]["values"]) and max(row[metric]["values"]) <= 1.0 and lo <= hi
    # different seeds give different random-init encoders
    assert len({r["linear"] for r in results["runs"] if r["arm"] == "random_init"} |
               {r["knn"] for r in results["runs"] if r["arm"] == "random_init"}) >= 2
    assert "rel_pixel" in arms["videomae"]["final"] and "rel_track_motion" in arms["trackmae[synthetic_gt]"]["final"]
    table = (out / "table.md").read_text()
    assert "trackmae[synthetic_gt]" in table and "chance 12.5%" in table
    assert (out / "chart.png").stat().st_size > 1000
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed*.json")}
    assert len(stamps) == 8
    capsys.readouterr()
    assert main(argv) == 0  # finished runs are reused, not rerun
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/seed*.json")} == stamps
