"""The `medhash` command: every package's subcommands, a fast --help, one-line errors."""
import subprocess
import sys


def test_help_lists_every_subcommand_without_importing_heavy_libraries():
    code = (
        "import sys; from medhash.services.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'gradio', 'pymilvus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    listing = subprocess.run([sys.executable, "-m", "medhash.services.cli", "--help"], capture_output=True, text=True).stdout
    for command in ("data", "features", "augment", "train", "eval"):
        assert command in listing


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path):
    missing = tmp_path / "nowhere"
    out = subprocess.run(
        [sys.executable, "-m", "medhash.services.cli", "data", "summary", "--dataset", "medpix2", "--root", str(missing)],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("medhash: error:") and str(missing) in out.stderr
    assert "Traceback" not in out.stderr


def test_a_wrong_config_value_names_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  batch_size: one\n")
    out = subprocess.run(
        [sys.executable, "-m", "medhash.services.cli", "train", "--config", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True,
    )
    assert out.returncode == 2
    assert "train.batch_size" in out.stderr and "Traceback" not in out.stderr


def test_command_line_overrides_are_validated_like_the_file(tmp_path):
    def medhash(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medhash.services.cli", *args], capture_output=True, text=True)

    cases = [
        (("serve", "--run", str(tmp_path), "--port", "99999"), "serve.port"),
        (("train", "--out", str(tmp_path / "run"), "--bits", "12"), "codes.bits"),
        (("train", "--out", str(tmp_path / "run"), "--set", "method_params.lsch.alpha=-1"), "method_params.lsch.alpha"),
        (("train", "--out", str(tmp_path / "run"), "--set", "train.no_such_field=1"), "train.no_such_field"),
        (("train", "--out", str(tmp_path / "run"), "--method", "nope"), "unknown method 'nope'"),
        (("ui", "--port", "0"), "port"),
    ]
    for args, field in cases:
        out = medhash(*args)
        assert out.returncode == 2 and field in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
