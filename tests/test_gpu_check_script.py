"""scripts/gpu_check.sh's control flow, without a GPU: its parts fit one device command, a
part left out for lack of time is reported and does not fail the run, a failing part does,
and a machine whose device compute-sanitizer refuses is reported, not failed.

nvidia-smi, nvcc, compute-sanitizer and python are stand-ins here (fake_tools); what the
parts themselves check runs on a GPU machine only.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DEVICE_COMMAND_S = 540  # 9 of a device command's 10 minutes, the build included

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def test_the_parts_limits_fit_one_device_command():
    text = SCRIPT.read_text()
    limits = [int(s) for s in re.findall(r"^\s*part [a-z_]+ (\d+) ", text, re.M)]
    assert len(limits) == 5, "build, tests, bench_block, bench_pipeline, sanitizer"
    assert sum(limits) <= DEVICE_COMMAND_S
    assert int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET:-(\d+)\}"', text).group(1)) <= DEVICE_COMMAND_S


def fake_tools(bin_dir: Path, python_body: str) -> None:
    """Stand-ins on PATH: nvcc writes a 'driver' that prints ok; compute-sanitizer runs the
    program it is given (FAKE_SANITIZER=refuses: says the device is not supported)."""
    scripts = {
        "nvidia-smi": "echo 'Fake GPU, 0.0, 1 MiB'",
        "nvcc": textwrap.dedent("""\
            if [ "$1" = --version ]; then echo 'release 13.0'; exit 0; fi
            while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
            printf '#!/usr/bin/env bash\\necho "ok: fake driver"\\n' > "$out"; chmod +x "$out"
            """),
        "compute-sanitizer": textwrap.dedent("""\
            if [ "${FAKE_SANITIZER:-}" = refuses ]; then echo '========= Error: Device not supported'; exit 1; fi
            while [ "${1#--}" != "$1" ]; do shift 2; done
            exec "$@"
            """),
        "fake-python": python_body,
    }
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)


def run_script(tmp_path, python_body="exit 0", **env):
    fake_tools(tmp_path / "bin", python_body)
    full_env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
                    PYTHON=str(tmp_path / "bin" / "fake-python"), **env)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=120)


def test_every_part_runs_and_a_refusing_sanitizer_is_reported_not_failed(tmp_path):
    result = run_script(tmp_path, FAKE_SANITIZER="refuses")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("build", "tests", "bench_block", "bench_pipeline", "sanitizer"):
        assert f"== {name}: exit 0" in result.stdout, name
    assert "compute-sanitizer cannot check this machine's device" in result.stdout
    assert "gpu_check: passed" in result.stdout


def test_the_sanitizer_runs_the_driver_where_it_works(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot check" not in result.stdout and "ok: fake driver" in result.stdout


def test_a_part_left_out_for_lack_of_time_is_reported_not_failed(tmp_path):
    slow_build = 'case "$*" in *setup.py*) sleep 7;; esac; exit 0'
    result = run_script(tmp_path, python_body=slow_build, GPU_CHECK_BUDGET="35")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== tests: left out" in result.stdout
    assert "left out for lack of time (not failures): tests bench_block bench_pipeline sanitizer" in result.stdout


def test_a_failing_part_fails_the_run(tmp_path):
    result = run_script(tmp_path, python_body='case "$*" in *test_pipeline_cuda*) exit 1;; esac; exit 0')
    assert result.returncode == 1
    assert "== tests: exit 1" in result.stdout and "gpu_check: FAILED" in result.stdout


def test_every_gpu_only_test_file_is_run():
    """A test file named *_cuda.py skips without a GPU: the script is where it runs."""
    text = SCRIPT.read_text()
    gpu_only = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*_cuda.py"))
    assert gpu_only and all(path in text for path in gpu_only), gpu_only
