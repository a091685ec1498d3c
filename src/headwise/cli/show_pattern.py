"""``headwise show-pattern``: build a pattern from its spec, print its density and tile-schedule stats, draw the
mask as ASCII when N <= 64, and as a PNG with ``--out``."""

from __future__ import annotations

from headwise.console import UsageError, parse_sizes, user_input
from headwise.patterns.draw import ASCII_MAX_N, ascii_mask, describe_pattern, plot_pattern

__all__ = ["add_arguments", "main"]


def add_arguments(p) -> None:
    """Add ``headwise show-pattern`` options to an :class:`argparse.ArgumentParser`."""
    p.add_argument("spec", help='pattern spec, e.g. "neighborhood(kernel_size=7)" or "causal"')
    p.add_argument("--grid", help="token grid, e.g. 64 or 32,32 or 8,16,16 (passed to the pattern as grid=)")
    p.add_argument("--n", type=int, help="sequence length (default: the product of --grid)")
    p.add_argument("--head", type=int, help="head to show, for head-specific patterns (default 0)")
    p.add_argument("--tile", default="64", help="tile size, or query,key tile sizes (default 64)")
    p.add_argument("--out", help="write the mask as a PNG here")


def main(args) -> int:
    """Build the pattern, print its density and tile schedule, draw it (ASCII up to 64 tokens, PNG with --out)."""
    from rich.console import Console

    status = Console(stderr=True).status  # a spinner while long masks are evaluated (hidden in pipes)
    with user_input(f"bad pattern {args.spec!r}"), status("building the pattern and its tile schedule"):
        grid = parse_sizes(args.grid, "--grid") if args.grid else None
        tile = parse_sizes(args.tile, "--tile")
        if len(tile) > 2:
            raise ValueError(f"--tile takes one or two sizes (query, key), got {args.tile!r}")
        view = describe_pattern(args.spec, grid=grid, n=args.n, head=args.head, tile=(tile[0], tile[-1]))
    for line in view.summary():
        print(line)
    if view.n <= ASCII_MAX_N:
        print()
        print(ascii_mask(view.pattern, view.n, view.head))
    elif not args.out:
        print(f"(N > {ASCII_MAX_N}: use --out mask.png to draw it)")
    if args.out:
        try:
            with status(f"drawing {args.out}"):
                path = plot_pattern(view, args.out)
        except OSError as e:
            raise UsageError(f"--out {args.out}: {e.strerror or e}") from None
        print(f"wrote {path}")
    return 0
