"""``python -m rlkit plugins | train ... | eval ...``"""
from __future__ import annotations

import sys


def plugins() -> None:
    from .registry import ALL

    for reg in ALL:
        print(f"{reg.hook}: {reg.doc}")
        for name in reg.names():
            obj = reg.get(name)
            own = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
            mod = sys.modules.get(getattr(obj, "__module__", ""), None)
            doc = (own or getattr(mod, "__doc__", None) or "").strip().splitlines()
            print(f"  {name:28s} {doc[0] if doc else ''}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        print("  plugins                 list every registered plugin by hook")
        print("  train recipe=... k=v    train (same as launch/train.py; use accelerate launch for several processes)")
        print("  eval model=DIR k=v      evaluate a model directory")
        print("  report RUN [RUN ...] [--out DIR]  one HTML page (plots, config, eval table, sample completions);")
        print("                          several runs are overlaid for comparison")
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "plugins":
        plugins()
    elif cmd == "train":
        from .cli import train_main

        train_main(rest)
    elif cmd == "report":
        from .report import main as report_main

        report_main(rest)
    elif cmd == "eval":
        from .evaluation import main as eval_main

        eval_main(rest)
    else:
        raise SystemExit(f"unknown command {cmd!r}: use plugins, train or eval")


if __name__ == "__main__":
    main()
