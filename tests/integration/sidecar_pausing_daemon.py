"""The sidecar daemon for the crash tests: `python -m tests.integration.sidecar_pausing_daemon --pause-at STATE
<options of python -m sidecar>`. Right after the agent persists STATE it creates <state_dir>/paused-<STATE> and
blocks there forever, holding the install where it stands, so the test can SIGKILL the daemon in that state."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sidecar.daemon_cli import add_options, run
from sidecar.state import State


def pause_in(state: State, state_dir: Path):
    def on_transition(new: State) -> None:
        if new == state:
            (state_dir / f"paused-{state.value}").touch()
            while True:
                time.sleep(3600)

    return on_transition


def main(argv: list[str] | None = None) -> int:
    parser = add_options(argparse.ArgumentParser(prog="python -m tests.integration.sidecar_pausing_daemon"))
    parser.add_argument("--pause-at", type=State, required=True, metavar="STATE")
    args = parser.parse_args(argv)
    return run(args, on_transition=pause_in(args.pause_at, Path(args.state_dir)))


if __name__ == "__main__":
    sys.exit(main())
