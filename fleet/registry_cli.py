"""`edgestack registry push|list|show|promote`: publish signed bundles as model versions, and read them back.

  edgestack registry push BUNDLE... [--report build/optimize/report.json] [--metric x86-avx2:power_w=6.5]
                          [--metrics metrics.json] [--changelog TEXT | --changelog-file FILE] [--root root.json]
  edgestack registry list [MODEL] [--json]
  edgestack registry show MODEL VERSION|SEMVER|ALIAS [--json] [--release]
  edgestack registry promote MODEL VERSION|SEMVER|ALIAS ALIAS

--registry URI (default $EDGESTACK_REGISTRY, else sqlite:///registry/registry.db): a SQLite file, or the URL
of an `mlflow server --serve-artifacts` (docs/REGISTRY.md). Handlers return exit codes and raise
fleet.errors.RegistryError, reported once by edgestack.cli.main. MLflow is imported only when a command runs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from fleet.errors import RegistryError
from fleet.registry_index import METRIC_NAMES, merge_metrics, parse_metric


def _registry(args: argparse.Namespace):
    from fleet.registry import Registry

    return Registry(args.registry, bundle_base_url=args.bundle_base_url)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns as wide as their widest cell; None shows as a dash."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _number(value: Any, digits: int) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def _size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _metrics_options(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from_file: dict = {}
    if args.metrics:
        try:
            from_file = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"cannot read --metrics {args.metrics}: {exc}") from exc
        if not isinstance(from_file, dict):
            raise RegistryError(f"--metrics {args.metrics}: must map device classes to {{metric: value}}")
    one_by_one: dict[str, dict[str, float]] = {}
    for text in args.metric or ():
        device_class, name, value = parse_metric(text)
        one_by_one.setdefault(device_class, {})[name] = value
    return merge_metrics(from_file, one_by_one)


def _changelog(args: argparse.Namespace) -> str:
    if args.changelog_file:
        try:
            return Path(args.changelog_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RegistryError(f"cannot read --changelog-file {args.changelog_file}: {exc}") from exc
    return args.changelog or ""


def cmd_push(args: argparse.Namespace) -> int:
    record = _registry(args).push([Path(p) for p in args.bundles], version=args.version, changelog=_changelog(args),
                                  metrics=_metrics_options(args), report=Path(args.report) if args.report else None,
                                  root_json=Path(args.root) if args.root else None, build_time=args.build_time)
    print(f"registered {record.model} {record.semver} as version {record.registry_version} in {args.registry}")
    print(_bundles_table(record))
    return 0


def _bundles_table(record) -> str:
    rows = []
    for device_class, bundle in sorted(record.bundles.items()):
        measured = record.metrics.get(device_class, {})
        rows.append([device_class, bundle.file, _size(bundle.size), bundle.sha256[:12],
                     _number(measured.get("fidelity_map"), 3), _number(measured.get("p50_ms"), 1),
                     _number(measured.get("p99_ms"), 1), _number(measured.get("power_w"), 1)])
    return table(["device class", "bundle", "size", "sha256", "fidelity mAP", "p50 ms", "p99 ms", "power W"], rows)


def cmd_list(args: argparse.Namespace) -> int:
    records = _registry(args).list(args.model)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2, sort_keys=True))
        return 0
    if not records:
        print(f"no model versions in {args.registry}" + (f" for {args.model}" if args.model else ""))
        return 0
    print(table(["model", "version", "semver", "aliases", "device classes", "build time", "registered"],
                [[r.model, r.registry_version, r.semver, ",".join(r.aliases) or None, ",".join(sorted(r.bundles)),
                  r.build_time, r.registered_at] for r in records]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    if args.release:
        print(json.dumps(registry.resolve(args.model, args.ref).to_dict(), indent=2, sort_keys=True))
        return 0
    record = registry.show(args.model, args.ref)
    if args.json:
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return 0
    facts = [("model", record.model), ("version", record.registry_version), ("semver", record.semver),
             ("aliases", ", ".join(record.aliases) or "-"), ("target", record.target),
             ("build time", record.build_time), ("registered", record.registered_at), ("run", record.run_id)]
    print("\n".join(f"{name + ':':<12}{value if value is not None else '-'}" for name, value in facts))
    print("changelog:\n  " + ("\n  ".join(record.changelog.splitlines()) if record.changelog else "-"))
    print("\n" + _bundles_table(record))
    if record.build_manifest:
        print("\nbuild manifest:")
        for bundle_file, summary in sorted(record.build_manifest.items()):
            print(f"  {bundle_file}: " + (json.dumps(summary, sort_keys=True) if summary else "no build manifest"))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    record = _registry(args).promote(args.model, args.ref, args.alias)
    print(f"{record.model}@{args.alias} -> version {record.registry_version} ({record.semver}); "
          f"aliases of that version: {', '.join(record.aliases)}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    from fleet.registry import default_registry_uri

    parser.add_argument("--registry", default=default_registry_uri(), metavar="URI",
                        help="sqlite:///PATH.db or http://host:port of an `mlflow server --serve-artifacts` "
                             "(default: $EDGESTACK_REGISTRY, else %(default)s)")
    parser.add_argument("--bundle-base-url", metavar="URL",
                        help="HTTP URL that serves the artifact root, for device-fetchable bundle URLs of a SQLite "
                             "registry (default: local paths; a tracking server's own artifact proxy)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `registry` (push, list, show, promote) on an argparse subparsers object."""
    registry = subparsers.add_parser(
        "registry", help="the model registry (MLflow): publish signed bundles, list, show, promote",
        description="Model versions in an MLflow model registry: the signed bundle per device class, measured "
                    "metrics per class, build manifest, changelog and build time; aliases such as production.",
        epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = registry.add_subparsers(dest="registry_command", required=True)

    push = sub.add_parser("push", help="register one model version made of signed bundles",
                          description="Register the bundles (one model, one semver; each counts for every device "
                                      "class it is built for, a class may not be claimed twice) as one version.")
    push.add_argument("bundles", nargs="+", metavar="BUNDLE", help="signed bundle files (`edgestack bundle create`)")
    push.add_argument("--version", help="semver expected (default and only accepted: the bundles' signed one)")
    changelog = push.add_mutually_exclusive_group()
    changelog.add_argument("--changelog", default="", help="what changed, for the record")
    changelog.add_argument("--changelog-file", metavar="FILE", help="read the changelog from a file")
    push.add_argument("--report", metavar="REPORT_JSON",
                      help="report.json of `edgestack optimize`: fidelity and latency of each bundle's variant")
    push.add_argument("--metrics", metavar="JSON_FILE", help="{device class: {metric: value}} measured elsewhere")
    push.add_argument("--metric", action="append", metavar="CLASS:NAME=VALUE",
                      help=f"one measured metric (repeatable); NAME one of {', '.join(METRIC_NAMES)}")
    push.add_argument("--root", metavar="ROOT_JSON", help="verify the bundles against this root.json first")
    push.add_argument("--build-time", metavar="ISO8601", help="default: the newest bundle file's modification time")
    _common(push)
    push.set_defaults(func=cmd_push)

    listing = sub.add_parser("list", help="model versions, newest first")
    listing.add_argument("model", nargs="?", help="one registered model (default: all)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(listing)
    listing.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one model version: bundles, metrics, manifest, changelog")
    show.add_argument("model")
    show.add_argument("ref", metavar="VERSION|SEMVER|ALIAS", help="registry version (3), semver (1.2.0) or alias")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.add_argument("--release", action="store_true",
                      help="print the Release a rollout installs (bundle URLs a device fetches) as JSON")
    _common(show)
    show.set_defaults(func=cmd_show)

    promote = sub.add_parser("promote", help="point an alias (production, canary, ...) at a version")
    promote.add_argument("model")
    promote.add_argument("ref", metavar="VERSION|SEMVER|ALIAS")
    promote.add_argument("alias")
    _common(promote)
    promote.set_defaults(func=cmd_promote)
    return registry
