"""`python -m sidecar --repository R --triton-http URL --state-dir D --trust-dir T --port P`: the update daemon."""
import argparse
import sys

from sidecar.daemon_cli import add_options, run


def main(argv=None) -> int:
    parser = add_options(argparse.ArgumentParser(prog="python -m sidecar", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
