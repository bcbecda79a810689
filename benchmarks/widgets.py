"""Latency of the interactive explorers (gradbook.explorers): from setting a dial to the figure redrawn.

    python benchmarks/widgets.py [--repeats 12]

Each explorer is built as in Jupyter and its dials are set programmatically, as a reader's click would;
the widget's callback recomputes (or takes the cached result), redraws the one figure and swaps the new
PNG into the Image widget before the assignment returns, so the time of the assignment is the latency.
"new" settings have not been seen before (the computation runs); "revisited" ones come from the cache
(only the redraw runs). Prints median and 90th percentile per explorer, on one math thread.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time


def _percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12, help="settings per explorer and kind")
    args = parser.parse_args()
    import gradbook as gb

    gb.setup(0)
    # dial moves a reader would make, cycling through each explorer's dials
    moves = {
        "gradient_flow": [("depth", [10, 30, 45, 5]), ("activation", ["sigmoid", "relu", "tanh", "gelu"]),
                          ("sigma_w", [0.6, 1.4, 2.0, 0.8]), ("width", [32, 128, 96, 48]),
                          ("norm", ["batch", "layer", "none"]), ("residual", [True, False])],
        "recurrent": [("sigma_max", [0.8, 1.1, 1.3, 0.9, 1.05]), ("length", [50, 150, 80, 120]),
                      ("activation", ["sigmoid", "relu", "linear", "tanh"])],
        "clipping": [("lr", [0.3, 3.0, 0.1, 2.0, 0.5]), ("mode", ["none", "value", "norm"]),
                     ("threshold", [0.3, 3.0, 0.1, 10.0])],
        "transformer": [("depth", [6, 24, 2, 16]), ("residual", ["gpt2", "default"]), ("seed", [1, 2, 3])],
    }
    print(f"gradbook.explorers: latency from setting a dial to the redrawn figure ({args.repeats} settings each)")
    for name, dials in moves.items():
        sequence = list(itertools.islice(itertools.cycle([(d, v) for d, vs in dials for v in vs]), args.repeats))
        times = {}
        for kind in ("new", "revisited"):   # the second pass replays the same moves: every result is cached
            ex = getattr(gb.explorers, name)()
            ex.widget   # build the widgets and draw the first figure (imports, first render: not counted)
            times[kind] = []
            for dial, value in sequence:
                t0 = time.perf_counter()
                ex.dials[dial].value = value
                times[kind].append(time.perf_counter() - t0)
            ex.close()
        new, revisited = times["new"], times["revisited"]
        print(f"    {name:14s} new: median {statistics.median(new):.3f} s, p90 {_percentile(new, 0.9):.3f} s;"
              f"  revisited: median {statistics.median(revisited):.3f} s, p90 {_percentile(revisited, 0.9):.3f} s")


if __name__ == "__main__":
    main()
