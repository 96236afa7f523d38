"""
FineWeb-Edu's 10B-token sample (HuggingFaceFW/fineweb-edu, files sample/10BT/*.parquet, column
`text`) as text shards: a smaller, educational alternative to DCLM-Baseline, enough for
config/79m.py's text run. The same processing as data/dclm/prepare.py (see there).

    python data/fineweb_edu/prepare.py [--max_tokens=N] [--local_dir=DIR]
"""

import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from data.dclm import prepare as dclm  # noqa: E402
from data.errors import report_user_errors  # noqa: E402

if __name__ == "__main__":
    report_user_errors()  # a bad setting or file prints one "error:" line, not a traceback
    dclm.main(repo_id="HuggingFaceFW/fineweb-edu",
              revision="main",  # pass --revision=<commit> to pin one
              patterns=["sample/10BT/*.parquet"],
              out_dir=os.path.dirname(os.path.abspath(__file__)),
              description=__doc__)
