"""`loraserve keys add|list|remove`: manage the API keys file of a server. loraserve.cli owns the
flags; these functions take its parsed arguments. Errors (a broken file, a duplicate name) are
ConfigError, which loraserve.cli prints as one line with exit status 2."""

from __future__ import annotations

import argparse
import json
import sys

from loraserve.access.key_admin import add_key, list_keys, remove_key


def keys(args: argparse.Namespace) -> int:
    """Dispatch on the keys action."""
    return {"add": _add, "list": _list, "remove": _remove}[args.action](args)


def _add(args: argparse.Namespace) -> int:
    token = add_key(args.keys_file, args.name, args.tenant, args.role)
    # The key alone on stdout, so `KEY=$(loraserve keys add ...)` captures exactly it; the notes
    # go to stderr, where a person still sees them.
    print(token)
    print(f"added key {args.name!r} (tenant {args.tenant}, role {args.role}) to {args.keys_file}.\n"
          "This is the only time the key is shown: it cannot be shown again (the file keeps only a "
          "salted hash). Store it now, e.g. as LORASERVE_API_KEY for the client.\n"
          "A running server picks it up on SIGHUP, or by itself within seconds.", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    infos = list_keys(args.keys_file)
    if args.json:
        print(json.dumps([i._asdict() for i in infos], indent=2))
    elif not infos:
        print(f"no keys in {args.keys_file}")
    else:
        header = ("NAME", "KEY_ID", "TENANT", "ROLE", "CREATED")
        widths = [max(len(str(row[i])) for row in (header, *infos)) for i in range(len(header))]
        for row in (header, *infos):
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def _remove(args: argparse.Namespace) -> int:
    remove_key(args.keys_file, args.name)
    print(f"removed key {args.name!r} from {args.keys_file}; a running server drops it on SIGHUP, "
          "or by itself within seconds")
    return 0
