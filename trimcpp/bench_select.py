"""``python -m trimcpp.bench_select``: the selection benchmark (:mod:`trimcpp.bench.selection`)."""

from .bench.selection import main

if __name__ == "__main__":
    raise SystemExit(main())
