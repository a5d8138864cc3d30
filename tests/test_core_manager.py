"""Plugin discovery (kdhooks/_manager.py): a third-party plugin installed from its package is found by its entry point."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_third_party_plugin_is_found_by_its_entry_point(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "third_party_plugin")], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "kdhooks.cli", "plugins"], env=env, check=True,
                            capture_output=True, text=True).stdout
    assert any(line.split()[:3] == ["cosine", "kdhooks-cosine", "0.2.0"] and "term:cosine" in line
               for line in listed.splitlines())
    script = (
        "import torch, torch.nn.functional as F, kdhooks\n"
        "from kdhooks.demo import student_cnn, teacher_cnn\n"
        "s, t = student_cnn(), teacher_cnn()\n"
        "x = torch.rand(4, 1, 8, 8)\n"
        "with kdhooks.Distiller(s, t, {'terms': [{'kind': 'cosine', 'weight': 2.0}]}) as kd:\n"
        "    out = s(x); kd(None)\n"
        "    expected = 2 * (1 - F.cosine_similarity(out, t.eval()(x), dim=1)).mean()\n"
        "    assert abs(kd.last_losses['cosine'] - expected.item()) < 1e-5, kd.last_losses\n"
        "print('ok')\n")
    ran = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr
