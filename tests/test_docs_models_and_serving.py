"""docs/guides/models-and-serving.md: every ```python block runs as written, in order, each
in a fresh interpreter (default devices), in one scratch directory (a later block reads
what an earlier one wrote: the exported model, the checkpoint)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GUIDE = ROOT / "docs" / "guides" / "models-and-serving.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)


def test_guide_has_its_examples():
    assert len(BLOCKS) == 6, "the guide lost (or gained) a ```python example"


@pytest.mark.slow
def test_guide_blocks_run_in_order(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    outputs = []
    for index, block in enumerate(BLOCKS):
        out = subprocess.run(
            [sys.executable, "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, f"block {index}:\n{out.stderr[-3000:]}"
        outputs.append(out.stdout)
    ema, accumulation, hparams, serving, rebuild, warm = outputs
    assert "val_ema_loss" in ema
    assert "8 micro-batches" in accumulation
    assert "['run0', 'run1', 'run2']" in hparams and hparams.count("hparam") == 0
    assert "served (7, 2)" in serving
    assert "logits (7, 2)" in rebuild
    assert "step 0 momentum zero: True" in warm
    assert "params['Dense_0']['kernel']: source float32[10, 16], new model float32[10, 32]" in warm
