"""``python -m dynadiff.metrics weights`` and the cheap-import promise."""

import os
import subprocess
import sys


def _run(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dynadiff.metrics", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120
    )


def test_weights_lists_present_and_missing(weight_files, tmp_path):
    out = _run(["weights", "--weights-dir", str(tmp_path / "none")], env={"TORCH_HOME": str(weight_files["torch_home"])})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    row = {line.split()[0]: line for line in lines if line and not line.startswith(" ")}
    assert "present  (no weights needed)" in row["pixcorr"]
    assert "present" in row["alexnet2"] and str(weight_files["alexnet"]) in row["alexnet2"]
    assert "present" in row["effnet"] and "efficientnet_b1_rwightman-bac287d4.pth" in row["effnet"]
    assert "present" in row["swav"] and "swav_800ep_pretrain.pth.tar" in row["swav"]
    assert "MISSING" in row["clip"] and str(tmp_path / "none" / "clip-vit-large-patch14") in row["clip"]
    assert "MISSING" in row["dreamsim"]
    assert "to get it: `hf download openai/clip-vit-large-patch14" in out.stdout
    assert "7 of 9 metrics can run" in out.stdout


def test_weights_options_override(weight_files, tmp_path):
    out = _run(["weights", "--torch-home", str(tmp_path), "--clip-path", str(weight_files["clip"])])
    assert out.returncode == 0, out.stderr
    row = {line.split()[0]: line for line in out.stdout.splitlines() if line and not line.startswith(" ")}
    assert "present" in row["clip"]
    assert "MISSING" in row["alexnet2"] and str(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in row["alexnet2"]
    assert "download https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in out.stdout


def test_config_import_is_cheap():
    code = "import sys, dynadiff.metrics, dynadiff.metrics.config, dynadiff.metrics.weights; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
