"""``diffkv`` command line: ``diffkv demo`` and ``diffkv bench``."""

from __future__ import annotations

import argparse
import os
import sys


def _select_triton_mode(backend: str) -> None:
    """The CLI is a program, so it may choose the Triton interpreter for its own
    process when the Triton backend is asked for on a machine without CUDA."""
    if backend == "triton" and "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
            print("no CUDA GPU: running the Triton kernels in the Triton interpreter (slow, small shapes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from diffkv import demo

    p_demo = sub.add_parser("demo", help="a realistic mixed batch through the chosen backend, checked and timed")
    demo.add_arguments(p_demo)
    p_bench = sub.add_parser("bench", help="benchmark scenarios against measured hardware ceilings")
    from diffkv import bench

    bench.add_arguments(p_bench)
    args = parser.parse_args(argv)
    _select_triton_mode(getattr(args, "backend", "auto"))
    if args.command == "demo":
        ok = demo.run_demo(backend=args.backend, size=args.size, device=args.device, dtype=args.dtype,
                           repeats=args.repeats)
        return 0 if ok else 1
    if args.command == "bench":
        return bench.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
