"""
Overrides a script's default settings from config files and --key=value arguments.

A training script keeps its defaults as plain globals at the top (nanoGPT's style) and calls

    apply_overrides(globals(), sys.argv[1:])

Each argument is either a config file (a Python file of assignments, run in its own namespace)
or --key=value, applied in order, so later ones win. Every key must be one of the script's
settings and every value must have its default's type (an int is accepted for a float), so a
typo such as --learning_rat=1e-3 stops the run instead of being silently ignored.
"""

import ast
import contextlib
import io
import os

from data.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))


def _settings(namespace):
    """The script's settings: its public lower-case globals of plain data types (a dict: sweep.py's
    axes). Upper-case names are constants, often imported (VISION_ENCODERS), never settings."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, tuple, list, dict))}


def _checked(key, value, default, source):
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = type(value) is type(default)
    if not ok:
        raise UserError(f"{source}: {key} must be of type {type(default).__name__} "
                        f"(its default is {default!r}), got {value!r}")
    return value


def apply_overrides(namespace, argv):
    """Applies config files and --key=value arguments to `namespace` (a script's globals)."""
    settings = _settings(namespace)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("settings (override with a config file or --key=value):")
            for key, value in settings.items():
                print(f"  {key} = {value!r}")
            raise SystemExit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"argument {arg!r} must look like --key=value")
            key, text = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare word such as --init_from=resume is a string
            updates, source = {key: value}, arg
        else:
            file_namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), file_namespace)
            except OSError as e:
                raise UserError(f"cannot read config file {arg}: {e.strerror}") from None
            except Exception as e:  # a typo in the file: say where, without a traceback
                raise UserError(f"config file {arg}: {type(e).__name__}: {e}") from None
            updates = {k: v for k, v in file_namespace.items()
                       if not k.startswith("_") and not callable(v) and type(v).__name__ != "module"}
            source = arg
        for key, value in updates.items():
            if key not in settings:
                raise UserError(f"{source}: unknown setting {key!r}")
            namespace[key] = settings[key] = _checked(key, value, settings[key], source)
            print(f"config: {key} = {namespace[key]!r}")
    return settings


def script_settings(script, args):
    """The settings `script args` would run with, without running it: the script's literal
    defaults (the assignments at its top, read from its source) with the config files and
    --key=value arguments applied. sweep.py plans its stages and bench.py builds config/1b.py's
    model this way."""
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, TypeError, SyntaxError):
                settings[node.targets[0].id] = ast.literal_eval(node.value)
    with contextlib.redirect_stdout(io.StringIO()):  # it echoes every setting it applies
        apply_overrides(settings, args)
    return settings
