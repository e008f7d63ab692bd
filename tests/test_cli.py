"""`tierkv info` answers on any machine, GPU or not, native module or not."""
import subprocess
import sys


def test_info_reports_versions_native_status_backends_and_settings():
    out = subprocess.run([sys.executable, "-m", "tierkv.cli", "info"], capture_output=True, text=True, check=True)
    for fragment in ("tierkv", "torch", "native ops", "cuda codecs", "disk backend  posix", "disk backend  kvikio",
                     "TIERKV_DISK_PATH"):
        assert fragment in out.stdout


def test_info_says_why_the_reference_path_is_used():
    env_out = subprocess.run([sys.executable, "-m", "tierkv.cli", "info"], capture_output=True, text=True,
                             check=True, env={"TIERKV_FORCE_REFERENCE": "1", "PATH": "/usr/bin:/bin"})
    assert "reference (TIERKV_FORCE_REFERENCE is set)" in env_out.stdout
