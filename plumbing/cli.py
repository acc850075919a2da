"""plumbing/cli.py: command lines built from a config dataclass, so every setting is typed once.

Each field of a config dataclass is declared with opt(default, "help text", ...): its name gives the flag
(lora_rank -> --lora-rank), its type the parser (int | None -> int, bool -> a switch), its metadata the help,
the choices and the smallest allowed value. group= starts an argument group in --help; the fields after it
belong to it until the next group=. build_parser() makes the argparse parser;
check_ranges() turns an out-of-range value into one ValueError naming the flag.
"""

import argparse
import sys
import types
from dataclasses import MISSING, field, fields

# The errors that mean bad input (a missing file, a malformed one, impossible flags): every CLI of handtune
# turns them into one line, `error: <what is wrong, what to do>`, and exit code 1, never a traceback.
# handtune's own checks raise these with the file and the fix in the message.
USER_ERRORS = (ValueError, OSError, RuntimeError, KeyError)


def error_line(e):
    """The one line a CLI prints for a USER_ERRORS exception (KeyError's own repr quotes dropped)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return "error: " + msg.replace("\n", " ")


def opt(default, help, *, group=None, choices=None, min=None, above=None, flag=None, metavar=None):
    """A dataclass field that is also a command-line option. min: smallest allowed value; above: the value
    must be greater than this; flag: the option string when it is not --field-name."""
    meta = dict(help=help, group=group, choices=choices, min=min, above=above, flag=flag, metavar=metavar)
    return field(default=default, metadata=meta)


def flag_of(f):
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(t):
    """int | None -> int; str -> str; bool stays bool."""
    if isinstance(t, types.UnionType):
        t = next(a for a in t.__args__ if a is not type(None))
    return t


class HelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help when X says something (not None, False or "")."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            return action.help
        return action.help + " (default: %(default)s)"


def build_parser(config_cls, description, epilog=None):
    """An argparse parser with one option per field of config_cls, in field order."""
    p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    g = p
    for f in fields(config_cls):
        m = f.metadata
        if m.get("group"):
            g = p.add_argument_group(m["group"])
        default = None if f.default is MISSING else f.default
        kind = _base_type(f.type)
        kw = dict(dest=f.name, default=default, help=m.get("help"))
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=kind, choices=m.get("choices"), metavar=m.get("metavar"))
        g.add_argument(flag_of(f), **kw)
    return p


def parse(config_cls, argv, description, epilog=None):
    """(config, the option strings given on the command line): the second tells "--lora-rank 8 given" from
    "default 8"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser(config_cls, description, epilog).parse_args(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("-")}
    return config_cls(**{f.name: getattr(ns, f.name) for f in fields(config_cls)}), given


def check_ranges(cfg):
    """Raise ValueError for the first field whose value is below its min (or not above its above)."""
    for f in fields(cfg):
        v, lo, above = getattr(cfg, f.name), f.metadata.get("min"), f.metadata.get("above")
        if v is None or isinstance(v, bool):
            continue
        if lo is not None and v < lo:
            raise ValueError(f"{flag_of(f)} must be >= {lo}, got {v}")
        if above is not None and not v > above:
            raise ValueError(f"{flag_of(f)} must be > {above}, got {v}")
