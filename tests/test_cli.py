import subprocess
import sys


def test_demo_runs_end_to_end_in_a_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "weight_mapper", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "converted model computes what the old one did" in out.stdout
    assert (tmp_path / "new_model.safetensors").is_file()


def test_no_command_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "weight_mapper"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "demo" in out.stdout
