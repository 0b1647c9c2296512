"""The store's command line: `python -m slf_utils.store check ROOT [--repair]` and `... migrate ROOT`.
Exit status: 0 consistent (or migrated), 1 problems listed, 2 not a store / a format or lock refusal."""

from __future__ import annotations

import argparse
import sys

from slf_utils.locks import StoreLocked
from slf_utils.store.api import Store
from slf_utils.store.files import StoreError
from slf_utils.store.index import StoreFormatError, is_store
from slf_utils.store.migration import migrate


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m slf_utils.store", description="Store housekeeping.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="bring an older store to this format in place").add_argument("root")
    c = sub.add_parser("check", help="verify every done row's array file; list orphans and temp files")
    c.add_argument("root")
    c.add_argument("--repair", action="store_true", help="remove orphans and temp files, mark bad rows failed")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "migrate":
            migrate(args.root)
            return
        is_store(args.root)
        problems = Store(args.root, journal_mode=None).check(repair=args.repair)
    except (FileNotFoundError, StoreFormatError, StoreLocked, StoreError) as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(problems) or "consistent")
    raise SystemExit(1 if problems else 0)
