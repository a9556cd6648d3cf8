"""The GPU check's CPU side, run here without a GPU: the script's dry run, and benchmarks/gpu_check.py --cpu-only
(NMS written for the device, run with NumPy, keeps exactly what the CPU path keeps on every fixture photo; the
steps that need a GPU say they were not run). Run as programs: tests never import benchmarks/."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_script_dry_run_names_the_pinned_packages_and_the_check():
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--runs", "5"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "OUT": "/tmp/x"})
    assert out.returncode == 0, out.stderr
    assert "cupy-cuda12x==" in out.stdout and "tensorrt-cu12==10." in out.stdout
    assert "benchmarks/gpu_check.py --out /tmp/x --runs 5" in out.stdout


def test_cpu_only_check_runs_the_cpu_sides_and_says_what_it_did_not_run(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-only", "--out", str(tmp_path),
                          "--runs", "2", "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in data["steps"]}
    nms = steps["NMS (per photo)"]
    assert nms["ok"] is True and nms["cpu_ms"] > 0
    photos = len([p for p in (ROOT.parent / "shared" / "fixtures" / "images").iterdir()
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png")])
    assert f"same kept boxes on {photos}/{photos} photos (numpy)" in nms["note"]
    assert steps["preprocess (per photo)"]["cpu_ms"] > 0 and steps["preprocess (per photo)"]["gpu_ms"] is None
    assert steps["TensorRT plans, serving"]["ok"] is None
    assert "| step | CPU ms | GPU ms | CPU/GPU | ok | note |" in (tmp_path / "gpu_check.md").read_text()
