"""Every Triton kernel compiled for A100 (sm_80) and H100 (sm_90a) with no GPU present, at the
launch settings the code uses and config/1b.py's and config/79m.py's shapes, then assembled by
ptxas: a compile error or a register spill fails (kernels/ahead_of_time.py). docs/measured.md
shows the same table, and must be updated when the kernels change."""

import os
import subprocess
import sys

from tests.tiny_data import ROOT


def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills():
    result = subprocess.run([sys.executable, "-m", "kernels.ahead_of_time"], cwd=ROOT, capture_output=True, text=True,
                            timeout=900, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    kernels = {row.split(" | ")[0].lstrip("| ") for row in rows}
    assert kernels == {"rms_norm fwd D=2048", "rms_norm bwd D=2048", "rms_norm fwd D=512", "rms_norm bwd D=512",
                       "swiglu fwd", "swiglu bwd", "rotary fwd H=16 hd=128", "rotary bwd H=16 hd=128",
                       "rotary fwd H=4 hd=128", "rotary bwd H=4 hd=128", "cross_entropy loss V=100352",
                       "cross_entropy loss+grad V=100352"}
    assert len(rows) == 48  # 12 builds x 2 dtypes x 2 architectures
    page = open(os.path.join(ROOT, "docs", "measured.md")).read().splitlines()
    shown = [line for line in page if line.startswith("| ") and line.split(" | ")[0].lstrip("| ") in kernels]
    assert shown == rows, ("docs/measured.md's kernel table differs from `python -m kernels.ahead_of_time`, which "
                           "prints:\n" + "\n".join(rows))
