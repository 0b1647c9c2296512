"""benchmarks/faults.py: kill -9 at random points of re-writes, cache builds and migrations, two writers, readers;
no inconsistency may follow (issue 19). Run as its own process: its children are forked, and forking this one
(torch and its threads loaded) is not safe."""

import subprocess
import sys

import pytest

from slf_utils.basics import ROOT


def _run(tmp_path, faults, clips):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--faults", str(faults), "--clips", str(clips)]
    proc = subprocess.run([*cmd, "--root", str(tmp_path), "--seed", str(faults)], capture_output=True, text=True)
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert set(rows) >= {"rewrite", "cache", "migrate", "writers", "readers", "total"}, proc.stdout + proc.stderr
    for name in ("rewrite", "cache", "migrate", "writers", "readers"):
        assert int(rows[name][1]) > 0, proc.stdout  # every scenario was killed at least once
    runs, kills, bad = map(int, rows["total"][:3])
    assert kills >= faults and bad == 0 and proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_ten_injected_faults_leave_no_inconsistency(tmp_path):
    _run(tmp_path, 10, 30)


@pytest.mark.slow
def test_two_hundred_injected_faults_leave_no_inconsistency(tmp_path):
    _run(tmp_path, 200, 100)
