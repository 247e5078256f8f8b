"""
A script's config: one dataclass with a trailing comment on every field (all the hyperparameters on one
screen, as nanoGPT keeps them), set by config files and --key=value flags, applied in order:

    cfg = load_config(TrainConfig, ["configs/stage1_256_masked.py", "--max_steps=500"])

A config file is Python (`key = value` lines, run in a scope of its own: a value may be computed) or JSON
(an object of fields by name). Unlike an exec'd configurator, an unknown key or a value of the wrong type is a
one-line error that names it (a UsageError: a script exits 2 on it), and --help is read from the dataclass's
own comments, so that it cannot drift from the code.
"""
import inspect
import json
import os
import re
import textwrap
import traceback
import typing
from dataclasses import fields


class UsageError(ValueError):
    """A command that must change: a bad flag or value, a config file that does not parse, an input named on
    the command line that is not there. The scripts exit 2 on it, and 1 on a job that failed."""


def parse_value(key, text, typ):
    """'--key=value' text -> a value of type typ (bool, int, float, str, Optional); errors name the key."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if text.lower() == "none":
            return None
        typ = [t for t in typing.get_args(typ) if t is not type(None)][0]
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{key}: expected true or false, got {text!r}")
    try:
        return typ(text)
    except ValueError:
        raise UsageError(f"--{key}: expected {typ.__name__}, got {text!r}") from None


def model_overrides(text, cfg):
    """--model_args: 'field=value,...' -> {field: value} typed like the fields of cfg (a model preset's
    dataclass); a tuple field's values are joined by ':' ("mixer_depth=0,mlp_ratio=2.5:2.5")."""
    known = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if key not in known or not sep:
            raise UsageError(f"--model_args: {item!r} is not FIELD=VALUE with FIELD one of: "
                             f"{', '.join(known)}")
        old = known[key]
        if isinstance(old, tuple):
            out[key] = tuple(parse_value(f"model_args {key}", v, type(old[0])) for v in value.split(":"))
        else:
            out[key] = parse_value(f"model_args {key}", value, type(old))
    return out


def read_config_file(path):
    """{name: value} that a config file sets: a Python file (.py) run in a scope of its own, or a JSON object
    (.json). Its errors name the file and the line."""
    if not os.path.isfile(path):
        hint = f" (a flag is written --{path})" if "=" in path else ""
        raise UsageError(f"config file not found: {path}{hint}")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:  # json's message gives the line and column
            raise UsageError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path}: a JSON config is an object of fields by name, not a "
                             f"{type(values).__name__}")
        return values
    if not path.endswith(".py"):
        raise UsageError(f"{path}: not a config file: config files are Python (`key = value` lines, .py) or "
                         f"JSON (.json)")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except SyntaxError as e:
        raise UsageError(f"{path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # the config file's own line, not this function's
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        line = lines[-1] if lines else "?"
        raise UsageError(f"{path}:{line}: {type(e).__name__}: {e}") from None
    # its own names only: not __builtins__, not the modules it imported to compute a value
    return {k: v for k, v in scope.items() if not k.startswith("_") and not inspect.ismodule(v)}


def check_file_values(path, values, cls):
    """Every name a config file sets is a field of cls, of the field's type (an int does for a float; a bool
    is not an int)."""
    types = {f.name: f.type for f in fields(cls)}
    for key, value in values.items():
        if key not in types:
            raise UsageError(f"{path}: unknown config key {key!r}")
        expected = typing.get_args(types[key]) or (types[key],)
        ok = isinstance(value, expected) and (type(value) is not bool or bool in expected)
        if not ok and not (float in expected and type(value) is int):
            raise UsageError(f"{path}: {key} must be {types[key]}, got {value!r}")
    if not values:
        raise UsageError(f"{path}: sets no config field (a config file assigns fields of {cls.__name__})")


def load_config(cls, argv):
    """An instance of the dataclass cls from config files and --key=value overrides, applied in order."""
    cfg = cls()
    types = {f.name: f.type for f in fields(cls)}
    for arg in argv:
        if not arg.startswith("--"):
            values = read_config_file(arg)
            check_file_values(arg, values, cls)
            for key, value in values.items():
                setattr(cfg, key, value)
            continue
        key, sep, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise UsageError(f"unknown config key --{key} (python {script(cls)} --help lists them)")
        if not sep and bool in (types[key], *typing.get_args(types[key])):  # a bare switch: --overwrite
            sep, text = "=", "true"
        if not sep:
            raise UsageError(f"--{key}: give a value as --{key}=VALUE")
        setattr(cfg, key, parse_value(key, text, types[key]))
    return cfg


def script(cls):
    """The file that defines the dataclass cls: the script whose config it is ("train.py")."""
    return os.path.basename(inspect.getfile(cls))


def field_help(cls):
    """{field: its trailing comment} from the source of the dataclass cls, continued lines joined."""
    docs, field = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r" {4}(\w+): [^#]*?(?:#\s*(.*))?$", line):
            field, docs[m[1]] = m[1], m[2] or ""
        elif (m := re.match(r" {5,}#\s*(.*)$", line)) and field:  # a comment continued on the next line
            docs[field] += " " + m[1]
    return docs


def print_help(cls, doc):
    """The script's docstring, then every field of cls with its default and its comment."""
    print(doc.strip() + f"\n\nusage: python {script(cls)} [CONFIG.py|CONFIG.json ...] [--key=value ...]   "
          "(config files and overrides apply in order)\n\nfields, their defaults and meaning:")
    docs = field_help(cls)
    for f in fields(cls):
        flag = f"--{f.name}={getattr(cls, f.name)}"
        for i, text in enumerate(textwrap.wrap(docs[f.name], 110 - 33) or [""]):
            print(f"  {flag if i == 0 else '':<30} {text}")
