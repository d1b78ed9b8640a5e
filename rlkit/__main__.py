"""``python -m rlkit COMMAND ...``; commands:"""
from __future__ import annotations

import sys


def plugins(args=()) -> None:
    """``plugins``: every plugin by hook; ``plugins NAME``: that plugin's parameters (types, defaults, docs)."""
    from .registry import ALL

    args = list(args)
    if args and args[0] in ("-h", "--help"):
        print("usage: python -m rlkit plugins [NAME | HOOK] [recipe=R.yaml] [imports=[mod, file.py]]\n\n"
              "Without NAME: every registered plugin by hook.  With a plugin NAME: its docs and parameters (types, "
              "defaults, docs).  With a HOOK: its plugins.  recipe= / imports= also load user plugins (imports:).")
        return
    from .errors import run_cli

    run_cli(_user_imports, [a for a in args if "=" in a])  # recipe=R / imports=[...]: user plugins are listed too
    args = [a for a in args if "=" not in a]
    if args:
        from .clihelp import plugin_help

        for name in args:
            print(run_cli(plugin_help, name))
        return
    for reg in ALL:
        print(f"{reg.hook}: {reg.doc}")
        for name in reg.names():
            obj = reg.get(name)
            own = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
            mod = sys.modules.get(getattr(obj, "__module__", ""), None)
            doc = (own or getattr(mod, "__doc__", None) or "").strip().splitlines()
            print(f"  {name:28s} {doc[0] if doc else ''}")


def _user_imports(args) -> None:
    """Import the ``imports:`` of ``recipe=R`` and of ``imports=[...]`` (for ``plugins``)."""
    from .config import ConfigError, _read_yaml, _parse_value
    from .overrides import import_user_modules

    recipe = None
    for a in args:
        k, v = a.split("=", 1)
        if k == "recipe":
            recipe = v
            import_user_modules(_read_yaml(v).get("imports"), v)
        elif k == "imports":
            import_user_modules(_parse_value(v), recipe)
        else:
            raise ConfigError(f"plugins: unexpected argument {a!r} (only recipe=... and imports=[...])")


COMMANDS = [  # the help text and the unknown-command message both list these
    "  plugins [NAME] [recipe=R]  every registered plugin by hook; with NAME, its parameters (types, defaults, docs)",
    "  train recipe=... k=v    train (same as launch/train.py; use accelerate launch for several processes)",
    "  eval model=DIR k=v      evaluate a model directory (results: RUN/eval/ or output_dir=DIR)",
    "  report RUN [RUN ...] [--out DIR]  one HTML page (plots, config, eval table, sample completions);",
    "                          several runs are overlaid for comparison",
    "  convert-gguf SRC [OUT]  GGUF file (or installed package shipping one) -> HF model directory",
    "  launch [accelerate launch args] launch/train.py k=v  accelerate's launcher; a failing rank's one-line",
    "                          error is all that is printed (no launcher traceback), with the rank's exit code",
    "  rollout-worker recipe=... k=v --listen HOST:PORT  serve a trainer as a remote rollout worker",
    "                          (rollout.max_staleness >= 1, rollout.worker_addresses; docs/async.md)",
]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        for line in COMMANDS:
            print(line)
        print("  (COMMAND --help prints a command's usage)")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "plugins":
        plugins(rest)
    elif cmd == "train":
        from .cli import train_main

        train_main(rest)
    elif cmd == "report":
        from .report import main as report_main

        report_main(rest)
    elif cmd == "convert-gguf":
        from .gguf import main as gguf_main

        gguf_main(rest)
    elif cmd == "launch":
        from .launcher import launch_main

        launch_main(rest)
    elif cmd == "eval":
        from .evaluation import main as eval_main

        eval_main(rest)
    elif cmd == "rollout-worker":
        from .rollout.workers import cli_main as worker_cli

        worker_cli(rest)
    else:
        from .registry import suggest

        names = [line.split()[0] for line in COMMANDS if line.startswith("  ") and not line.startswith("   ")]
        raise SystemExit(f"unknown command {cmd!r}: use one of {', '.join(names)}." + suggest(cmd, names))


if __name__ == "__main__":
    from .errors import run_cli

    run_cli(main)  # a user error in any command: one line and a non-zero exit
