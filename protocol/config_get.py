"""Print one effective config value: `python -m protocol.config_get KEY [--config F] [--k v ...]`.

Launch scripts use it so that shell code reads the config through the same loader as Python.
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
    value = config_from_args(parser.parse_args(argv))
    for part in key.split("."):
        value = getattr(value, part)
    print(value if not dataclasses.is_dataclass(value) else dataclasses.asdict(value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
