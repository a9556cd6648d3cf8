"""`edgestack sidecar status|versions|history|blocked|install|rollback|unblock|root`: the daemon's API (sidecar.api)
from a shell.

Each command sends one request to the daemon on this device (--api, default http://127.0.0.1:8010) and
prints its JSON answer. Exit codes: 0 done; 1 the install, rollback or unblock failed (the answer says
why); 3 the daemon is busy or an interrupted install must be recovered first; 2 anything else (daemon not
reachable, bad request).
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_API = "http://127.0.0.1:8010"
EXIT_FOR_STATUS = {200: 0, 202: 0, 409: 3, 422: 1}


def call(api: str, method: str, path: str, body: dict | None = None, timeout_s: float = 30) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(api.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, {"error": exc.reason}


def _run(args: argparse.Namespace) -> int:
    body: dict | None = None
    timeout_s = args.timeout_s
    if args.ctl_command == "install":
        if "://" in args.source:
            if not args.sha256 or args.size is None:
                print("edgestack sidecar install: error: a URL needs --sha256 and --size (the bundle's)", file=sys.stderr)
                return 2
            body = {"url": args.source, "sha256": args.sha256, "size": args.size}
        else:
            body = {"bundle": str(Path(args.source).resolve())}
        body["wait"] = not args.no_wait
    elif args.ctl_command == "rollback":
        body = {"reason": args.reason}
    elif args.ctl_command == "unblock":
        body = {"sha256": args.sha256_prefix, "reason": args.reason}
    elif args.ctl_command == "root":
        try:
            body = {"root": json.loads(Path(args.root_json).read_text(encoding="utf-8"))}
        except (OSError, ValueError) as exc:
            print(f"edgestack sidecar root: error: {args.root_json}: {exc}", file=sys.stderr)
            return 2
    method, path = ("POST", f"/{args.ctl_command}") if body is not None else ("GET", f"/{args.ctl_command}")
    try:
        code, answer = call(args.api, method, path, body, timeout_s)
    except (urllib.error.URLError, OSError) as exc:
        print(f"edgestack sidecar {args.ctl_command}: error: no sidecar daemon answers at {args.api} ({exc})",
              file=sys.stderr)
        return 2
    if args.ctl_command == "history" and isinstance(answer, list) and args.last:
        answer = answer[-args.last:]
    print(json.dumps(answer, indent=1, sort_keys=True))
    if code not in EXIT_FOR_STATUS:
        print(f"edgestack sidecar {args.ctl_command}: error: HTTP {code}", file=sys.stderr)
    return EXIT_FOR_STATUS.get(code, 2)


def add_commands(subparsers) -> None:
    """Register status, versions, history, blocked, install, rollback, unblock and root on the `sidecar` command's
    subparsers."""
    def command(name: str, help_: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_, description=help_ + ". " + __doc__.split("\n\n")[1])
        parser.add_argument("--api", default=DEFAULT_API, help=f"the daemon's API (default {DEFAULT_API})")
        parser.add_argument("--timeout-s", type=float, default=1800, help="how long to wait for the answer")
        parser.set_defaults(func=_run, ctl_command=name)
        return parser

    command("status", "the agent's state, candidate, committed versions and last error")
    command("versions", "current, previous, kept and on-disk versions, and what Triton serves")
    history = command("history", "the persisted history: transitions, gate reports, rollbacks with reasons")
    history.add_argument("--last", type=int, default=0, metavar="N", help="only the last N entries")
    command("blocked", "bundles refused because an install verified them bad (sha256, reason, when)")
    install = command("install", "install a bundle file (full or delta) or a registry URL, and wait for the result")
    install.add_argument("source", metavar="BUNDLE_OR_URL")
    install.add_argument("--sha256", help="the bundle's sha256 (required for a URL)")
    install.add_argument("--size", type=int, help="the bundle's size in bytes (required for a URL)")
    install.add_argument("--no-wait", action="store_true", help="return once the install started (HTTP 202)")
    rollback = command("rollback", "stop an install in flight, or go back to the previous committed version")
    rollback.add_argument("--reason", required=True, help="recorded in the history and with the bad bundle")
    unblock = command("unblock", "let a blocked bundle be installed again (recorded in the history)")
    unblock.add_argument("sha256_prefix", metavar="BUNDLE_SHA_OR_PREFIX",
                         help="the sha256 of the blocked bundle's signed metadata, or 8+ hex digits of it "
                              "(`sidecar blocked` lists them)")
    unblock.add_argument("--reason", required=True, help="why it may be installed again (recorded in the history)")
    root = command("root", "key rotation: make the daemon trust the next root.json (from `edgestack keys rotate`)")
    root.add_argument("root_json", metavar="ROOT_JSON")


def main(argv: list[str] | None = None) -> int:
    """`python -m sidecar.ctl_cli status|versions|history|blocked|install|rollback|unblock|root ...` (no edgestack
    CLI needed)."""
    parser = argparse.ArgumentParser(prog="python -m sidecar.ctl_cli", description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
