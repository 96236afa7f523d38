"""Runs many short command lines of the project's scripts, each in a forked copy of this one
process, which imported torch and the project's modules once: a case then costs a fraction of a
second instead of the seconds of a fresh interpreter's imports. Each case runs as
`python SCRIPT ARGS...` would: sys.argv and sys.path[0] set, the script run as __main__, an
uncaught exception handed to sys.excepthook with exit status 1, SystemExit's status kept.

    python tests/script_cases.py CASES.json RESULTS.json

CASES.json: [[script, [args...]], ...]; RESULTS.json: [{"code", "stdout", "stderr"}, ...].
"""

import json
import os
import runpy
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy  # noqa: E402,F401  (the expensive imports, done once for every case)
import pyarrow.parquet  # noqa: E402,F401
import torch  # noqa: E402,F401

import common  # noqa: E402,F401
import model  # noqa: E402,F401
from data import hub, images, loader, shards, tokenizer  # noqa: E402,F401


def run_case(script, args, out_path, err_path):
    """Exit status of `python script args` run in a forked child, its output in the two files."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = [script, *args]
            sys.path[0] = os.path.dirname(os.path.join(ROOT, script))
            try:
                runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
                code = 0
            except SystemExit as e:  # as the interpreter treats it
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(cases_path, results_path):
    os.chdir(ROOT)
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for script, args in cases:
            code = run_case(script, args, out_path, err_path)
            with open(out_path) as out, open(err_path) as err:
                results.append({"code": code, "stdout": out.read(), "stderr": err.read()})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
