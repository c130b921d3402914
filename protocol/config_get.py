"""Print effective config values: `python -m protocol.config_get KEY[,KEY...] [--config F] [--k v ...]`.

One line per key, in order. Launch scripts use it so that shell code reads the config through the
same loader as Python (several keys at once: each Python start costs a few tenths of a second).
"""

import argparse
import dataclasses
import sys

from protocol.config import add_config_arguments, config_from_args


def main() -> int:
    key, argv = sys.argv[1], sys.argv[2:]
    parser = argparse.ArgumentParser(prog="python -m protocol.config_get")
    parser.add_argument("--index", help=argparse.SUPPRESS)
    add_config_arguments(parser)
    cfg = config_from_args(parser.parse_args(argv))
    for name in key.split(","):
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        print(value if not dataclasses.is_dataclass(value) else dataclasses.asdict(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
