"""``diffkv-conformance``: run the conformance suite on a backend class.

    diffkv-conformance --backend package.module:BackendClass [--device cpu|cuda]
                       [--profile quick|thorough] [--report out.json]

Exit status: 0 if every check passed (or was correctly rejected / not
declared / skipped), 1 if any check failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffkv-conformance",
        description="Check a DiffKV attention backend against the diffkv contract (SPEC sections 2-4), feature by "
                    "feature, and print a report.",
    )
    p.add_argument("--backend", required=True,
                   help="backend class: 'package.module:BackendClass', or 'reference' / 'triton'")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to run on (default: cuda if available and declared by the backend, else cpu)")
    p.add_argument("--profile", choices=("quick", "thorough"), default="quick",
                   help="quick: CI-sized (default); thorough: many more and larger hypothesis examples")
    p.add_argument("--report", metavar="OUT.json", default=None, help="also write the report as JSON")
    p.add_argument("--checks", metavar="PATTERNS", default=None,
                   help="only the checks whose id matches one of these comma-separated globs (e.g. 'feature/*,gqa')")
    p.add_argument("--dtypes", metavar="LIST", default=None,
                   help="only these of the declared dtypes, e.g. 'float16,float32' (others are reported skipped)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: the profile's)")
    p.add_argument("--list", action="store_true", help="list the checks for this backend and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: backends in the working directory are importable
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("diffkv-conformance: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device != "cuda" and not torch.cuda.is_available():
        # Triton kernels can only run in the interpreter here; it must be chosen before triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from conformance.checks import all_checks
    from conformance.report import format_report, write_json
    from conformance.runner import make_context, run_suite, select

    try:
        ctx = make_context(args.backend, device, args.profile, args.dtypes, args.seed)
    except (ImportError, ValueError, AttributeError) as e:
        print(f"diffkv-conformance: cannot load backend {args.backend!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    devices = tuple(getattr(ctx.caps, "devices", ()))
    if ctx.device.type not in devices:
        print(f"diffkv-conformance: backend {ctx.backend_ref} does not declare device {ctx.device.type!r} "
              f"(declares {list(devices)}); choose --device accordingly", file=sys.stderr)
        return 2
    checks = select(all_checks(ctx), args.checks)
    if args.list:
        for c in checks:
            print(f"{c.check_id:45s} {c.feature}")
        return 0
    if not checks:
        print(f"diffkv-conformance: no check matches --checks {args.checks!r} (see --list)", file=sys.stderr)
        return 2

    def progress(r):
        if not args.quiet:
            print(f"  {r.status.label:32s} {r.check_id}  ({r.seconds:.1f}s)", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"diffkv-conformance: {len(checks)} checks on {ctx.backend_ref} ({ctx.device.type}, profile "
              f"{ctx.profile.name})", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="diffkv-conformance-") as scratch:
        if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
            # hypothesis caches literals under ./.hypothesis; keep the user's directory clean
            from hypothesis.configuration import set_hypothesis_home_dir

            set_hypothesis_home_dir(scratch)
        report = run_suite(ctx.backend, ctx.device, ctx.profile, checks=[c.check_id for c in checks],
                           dtypes=args.dtypes, seed=args.seed, progress=progress)
    report.backend = ctx.backend_ref
    print(format_report(report))
    if args.report:
        write_json(report, args.report)
        print(f"JSON report written to {args.report}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
