import argparse
import sys


def main(argv: list[str] | None = None, prog: str = "python -m tools.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from tools.bench import engine as engine_bench

    engine_bench.add_parser(sub)
    from tools.bench import quant as quant_bench

    quant_bench.add_parser(sub)
    from tools.bench import forward as forward_bench

    forward_bench.add_parser(sub)
    from tools.bench import draft_gap

    draft_gap.add_parser(sub)
    try:
        from tools.bench import serve as serve_bench
    except ImportError:
        serve_bench = None
    if serve_bench is not None:
        serve_bench.add_parser(sub)
        from tools.bench import spec as spec_bench

        spec_bench.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
