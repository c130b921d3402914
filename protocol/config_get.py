"""The launch scripts' reading of the config: `python -m protocol.config_get PROG CWD [VAR=KEY ...] -- FLAG ...`.

Parses and validates the FLAGs as every process of the run will, so that a mistake is reported
once, in one line naming the closest valid key, before anything starts. Prints shell assignments
for the launcher to eval (one Python start for all of them): `args=(...)`, the FLAGs with
`--config` and the path options among them made absolute from CWD (the directory the launcher was
run from; it then changes to the repository), and `VAR=value` with the effective value of each KEY.
Errors are one line, prefixed with PROG, and exit 2.
"""

import shlex
import sys

from protocol.config import ConfigArgumentParser, ConfigError, absolute_flags, config_from_args


def main() -> int:
    split = sys.argv.index("--")
    prog, cwd, *wanted = sys.argv[1:split]
    parser = ConfigArgumentParser(prog=prog)
    args = parser.parse_args(sys.argv[split + 1:])
    try:
        cfg = config_from_args(args, cwd=cwd)
    except ConfigError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    lines = [f"args=({shlex.join(absolute_flags(args, cwd))})"]
    for pair in wanted:
        var, key = pair.split("=")
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # as a flag gives it
        lines.append(f"{var}={shlex.quote(text)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
