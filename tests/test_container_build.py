"""`gateway container build` runs the real build command line (checked here against a stand-in for
apptainer, which cannot be installed on these machines)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

STANDIN = Path(__file__).with_name("standin") / "apptainer-standin"
ROOT = Path(__file__).resolve().parent.parent


def run_build(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "apptainer"
    if not link.exists():
        link.symlink_to(STANDIN)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", GATEWAY_STANDIN_LOG=str(tmp_path / "calls.jsonl"))
    return subprocess.run([sys.executable, "-m", "gateway", "container", "build", "--runtime", "apptainer",
                           "--output", str(tmp_path / "desktop.sif"), *extra], capture_output=True, text=True,
                          env=env, timeout=60)


def test_build_runs_apptainer_build_in_the_definition_directory(tmp_path: Path) -> None:
    result = run_build(tmp_path, "--fakeroot")
    assert result.returncode == 0, result.stderr
    (call,) = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert call["argv"] == ["build", "--fakeroot", str(tmp_path / "desktop.sif"), str(ROOT / "containers" / "desktop.def")]
    assert call["cwd"] == str(ROOT / "containers")  # %files sources are relative to the definition
    assert (tmp_path / "desktop.sif").exists()


def test_existing_image_is_not_overwritten_without_force(tmp_path: Path) -> None:
    (tmp_path / "desktop.sif").write_text("precious")
    result = run_build(tmp_path)
    assert result.returncode == 2
    assert "use --force" in result.stderr
    assert (tmp_path / "desktop.sif").read_text() == "precious"
    assert run_build(tmp_path, "--force").returncode == 0


def test_missing_runtime_is_a_clear_error(tmp_path: Path) -> None:
    env = dict(os.environ, PATH="/usr/bin:/bin")
    result = subprocess.run([sys.executable, "-m", "gateway", "container", "build", "--runtime", "singularity",
                             "--output", str(tmp_path / "x.sif")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "gateway: error: singularity not found: install singularity to build the image"
