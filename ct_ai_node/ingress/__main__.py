"""Run the spool recovery and the Storage SCP in the foreground until SIGTERM/SIGINT.

    python -m ct_ai_node.ingress --root DIR --port P [--ae CTAI] [--allow AE[@HOST] ...] [--min-free-mb N]

For tests and benchmarks; ``ct-ai-node serve`` runs the whole node.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..logs import configure_logging
from ..spool import Spool
from ..stop_signals import StopSignals
from .scp import AllowedCaller, ScpSettings, StorageSCP, TlsSettings


def _caller(text: str) -> AllowedCaller:
    ae, _, host = text.partition("@")
    return AllowedCaller(ae or "*", host or None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ct_ai_node.ingress", description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="storage root: ROOT/spool/ and ROOT/node.db")
    p.add_argument("--db", type=Path, help="index database (default ROOT/node.db)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--ae", default="CTAI")
    p.add_argument("--allow", action="append", default=[], metavar="AE[@HOST]",
                   help="allowed caller (repeatable; AE '*' = any); none given: anyone may call")
    p.add_argument("--min-free-mb", type=float, default=2048.0)
    p.add_argument("--max-associations", type=int, default=8)
    p.add_argument("--acse-timeout", type=float, default=30.0)
    p.add_argument("--dimse-timeout", type=float, default=60.0)
    p.add_argument("--network-timeout", type=float, default=60.0)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--tls-ca", type=Path)
    p.add_argument("--no-fsync", action="store_true",
                   help="acknowledge once written (survives a node crash, not a power cut)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)

    configure_logging(logging.getLevelName(args.log_level.upper()))
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # per-message chatter
    tls = None
    if args.tls_cert:
        tls = TlsSettings(args.tls_cert, args.tls_key, args.tls_ca, require_client_cert=args.tls_ca is not None)
    settings = ScpSettings(ae_title=args.ae, host=args.host, port=args.port,
                           allowed_callers=[_caller(a) for a in args.allow], max_associations=args.max_associations,
                           acse_timeout_s=args.acse_timeout, dimse_timeout_s=args.dimse_timeout,
                           network_timeout_s=args.network_timeout, min_free_mb=args.min_free_mb, tls=tls)
    with StopSignals() as stop, Spool(args.root / "spool", args.db or args.root / "node.db",
                                      fsync=not args.no_fsync) as spool:
        spool.recover()
        scp = StorageSCP(settings, spool).start()
        try:
            stop.wait()
            logging.getLogger(__name__).info("%s: stopping", stop.received.name)
        finally:
            scp.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
