"""The benchmark script keeps working (its figures are reported in notes, not asserted: timing is noisy)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_watch_benchmark_runs_and_reports_every_arm():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--watch", "--steps", "4"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    for arm in ["plain", "floor: one bare pass", "watch(level='norms')", "watch(level='full')", "every=10"]:
        assert arm in out
    assert "x plain" in out


def test_diagnose_benchmark_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--diagnose"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "gb.diagnose" in out and "x one plain step" in out
