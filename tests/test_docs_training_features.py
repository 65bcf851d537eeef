"""docs/guides/training-features.md: each ```python block runs as written (fresh interpreter)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "guides" / "training-features.md"
BLOCKS = GUIDE.read_text().split("```python\n")[1:]
BLOCKS = [b.split("```")[0] for b in BLOCKS]


def test_guide_has_code_blocks():
    assert len(BLOCKS) >= 4, "the training-features guide lost its ```python examples"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_guide_block_runs(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
