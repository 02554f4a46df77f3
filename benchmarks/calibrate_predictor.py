"""Calibrate the constants of iunet_nb.measure.predict against the meter and report its accuracy.

The predictor (``iunet_nb/measure/predict.py``) counts parameters, gradients and the
tensors autograd saves exactly; what it cannot know a priori are a few
per-engine constants (working set of one step in units of its level tensor,
full-resolution tensors held through the backward, oneDNN weight-sized
temporaries).  This script takes measured rows -- a ``table1`` CSV
(``python -m iunet_nb.bench table1``) or fresh measurements (``--measure``,
one subprocess per configuration) -- fits the constants of every mode by a
grid search that minimises the worst relative error of the step peak
(gradients + activations), prints predicted vs measured, and with ``--write``
stores the constants in ``iunet_nb/measure/predict.py`` (between ``# BEGIN CONSTANTS``
and ``# END CONSTANTS``).

    python benchmarks/calibrate_predictor.py --csv data/results/table1-latest.csv
    python benchmarks/calibrate_predictor.py --measure --measure-sizes 64 128 --deltas 5 10 20 30 --write
    python benchmarks/calibrate_predictor.py --measure --modes fused --measure-sizes 64 128 256 \
        --deltas 5 20 --csv data/results/table1-<512 run>.csv --write   # fresh engine + a 512^2 row

Re-run it after any change to the engines (the fused engine's constants move
when its memory layout changes).
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from iunet_nb.measure import bench  # noqa: E402
from iunet_nb.measure import predict as P  # noqa: E402
from iunet_nb.arch.layout import compute_layout  # noqa: E402
from iunet_nb.common import MiB  # noqa: E402

GRID = {
    "tau": np.arange(0.0, 6.01, 0.25),
    "kappa": np.arange(0.0, 8.01, 0.25),
    "rho": np.arange(0.0, 6.01, 0.25),
    "gamma": np.arange(0.0, 12.01, 0.25),
    "sigma": np.arange(0.0, 3.01, 0.25),
}


def features(mode: str, size: int, delta: int, dtype: str = "float32") -> dict:
    layout = compute_layout(bench.CHANNELS, [delta] * len(bench.CHANNELS), 2)
    return P.prediction_features(layout, (1, bench.CHANNELS[0], size, size), dtype, mode)


def fit_mode(mode: str, rows: list[dict]) -> tuple[dict, np.ndarray]:
    """Constants minimising the worst relative error of the step peak over ``rows``."""
    names = P.CONSTANT_NAMES[P._kind(mode)]
    combos = np.array(list(itertools.product(*(GRID[n] for n in names))))  # (K, n)
    errs, aerrs = [], []
    for r in rows:
        f = features(mode, r["size"], r["delta"], r.get("dtype") or "float32")
        base = np.array(f["base"])[:, None]  # (ops, 1)
        coef = np.array(f["coef"], dtype=float)  # (ops, n)
        peak = (base + coef @ combos.T).max(axis=0)  # (K,)
        measured = r["peak_bytes"]
        errs.append(peak / measured - 1)
        act = peak - f["params"]
        aerrs.append((act - r["activation_bytes"]) / max(r["activation_bytes"], 1))
    errs = np.array(errs)  # (rows, K)
    # worst step-peak error first; the activation error (which the step peak hides where the
    # gradients dominate) breaks ties and pins the constants down physically
    score = np.abs(errs).max(axis=0) + 0.2 * np.abs(np.array(aerrs)).mean(axis=0)
    best = int(score.argmin())
    return {n: float(v) for n, v in zip(names, combos[best])}, errs[:, best]


def write_constants(constants: dict, note: str) -> None:
    """Replace the constants between ``# BEGIN CONSTANTS`` and ``# END CONSTANTS`` in the predictor's file."""
    path = Path(P.__file__)
    text = path.read_text()
    body = "CONSTANTS: dict[str, dict[str, float]] = {\n"
    for mode in P.MODES:
        items = ", ".join(f'"{k}": {v:g}' for k, v in constants[mode].items())
        body += f'    "{mode}": {{{items}}},\n'
    body += "}\n"
    body += f"CALIBRATION = {note!r}\n"
    new = re.sub(r"# BEGIN CONSTANTS\n.*?# END CONSTANTS", "# BEGIN CONSTANTS\n" + body + "# END CONSTANTS",
                 text, flags=re.S)
    path.write_text(new)
    print(f"wrote constants to {path}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", nargs="*", default=None,
                    help="table1 CSV(s) or .jsonl files of `_one --json` rows (default: data/results/table1-latest.csv)")
    ap.add_argument("--measure", action="store_true", help="measure the grid now (subprocess per config)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512],
                    help="sizes used for the fit (rows of other sizes are ignored)")
    ap.add_argument("--measure-sizes", type=int, nargs="+", default=[64, 128],
                    help="sizes measured with --measure")
    ap.add_argument("--deltas", type=int, nargs="+", default=[5, 10, 20, 30])
    ap.add_argument("--modes", nargs="+", default=list(P.MODES), choices=P.MODES)
    ap.add_argument("--write", action="store_true", help="store the fitted constants in predict.py")
    ap.add_argument("--keep", nargs="*", default=[], choices=P.MODES,
                    help="modes whose constants are kept as they are (only evaluated)")
    return ap


def measure_rows(sizes: list[int], deltas: list[int], modes: list[str]) -> list[dict]:
    """Measure every configuration in a fresh subprocess; the ok rows (also appended to a .jsonl file)."""
    from tqdm import tqdm

    saved = REPO / "data" / "results" / f"calibration-{dt.datetime.now():%Y%m%d-%H%M%S}.jsonl"
    saved.parent.mkdir(parents=True, exist_ok=True)
    print(f"measured rows go to {saved}")
    rows = []
    for size, delta, mode in tqdm([(s, d, m) for s in sizes for d in deltas for m in modes]):
        r = bench.run_config(mode, size, delta, repeats=0)
        if r["status"] == "ok":
            rows.append(r)
            with open(saved, "a") as f:  # keep the measurements: --csv <file>.jsonl reuses them
                f.write(json.dumps(r) + "\n")
        else:
            print(f"failed: {mode} {size} {delta}: {r.get('message')}")
    return rows


def read_rows(paths: list[str]) -> list[dict]:
    """The ok rows of table1 CSVs and of .jsonl files (rows as ``python -m iunet_nb.bench _one --json`` prints them)."""
    rows = []
    for p in paths:
        if p.endswith(".jsonl"):
            with open(p) as f:
                rows += [r for r in (json.loads(ln) for ln in f if ln.startswith("{")) if r["status"] == "ok"]
        else:
            rows += [r for r in bench.read_results(p) if r["status"] == "ok"]
    return rows


def fit_and_report(rows: list[dict], modes: list[str], keep: list[str]) -> tuple[dict, dict]:
    """Fit the constants of every mode not in ``keep`` and print predicted vs measured per row.

    Returns ``(constants by mode, worst relative error by mode)``.
    """
    constants = {m: dict(P.CONSTANTS[m]) for m in P.MODES}
    print(f"{'mode':<16} {'size':>5} {'delta':>5} {'measured step':>14} {'predicted':>10} {'err':>7}"
          f" {'total meas.':>12} {'total pred.':>12} {'err':>7} {'act. T meas':>11} {'pred':>6}  peak at")
    worst = {}
    for mode in modes:
        mrows = sorted((r for r in rows if r["mode"] == mode), key=lambda r: (r["size"], r["delta"]))
        if not mrows:
            continue
        if mode not in keep:
            constants[mode], _ = fit_mode(mode, mrows)
            if mode in ("unet", "unet_checkpoint"):
                constants[mode]["sigma"] = 0.0  # no couplings: sigma has no effect
        worst[mode] = 0.0
        for r in mrows:
            layout = compute_layout(bench.CHANNELS, [r["delta"]] * 5, 2)
            p = P.predict_step_memory(layout, (1, 64, r["size"], r["size"]), "float32", mode,
                                      constants=constants[mode])
            e_step = p.peak_step / r["peak_bytes"] - 1
            e_tot = p.total / r["total_bytes"] - 1
            worst[mode] = max(worst[mode], abs(e_step), abs(e_tot))
            print(f"{mode:<16} {r['size']:>5} {r['delta']:>5} {r['peak_bytes'] / MiB:>10.1f} MiB "
                  f"{p.peak_step / MiB:>10.1f} {100 * e_step:>+6.1f}% {r['total_bytes'] / MiB:>8.1f} MiB "
                  f"{p.total / MiB:>8.1f} MiB {100 * e_tot:>+6.1f}% {r['overhead_tensors']:>11.2f} "
                  f"{p.overhead_tensors:>6.2f}  {p.details['peak_at']}")
    return constants, worst


def main() -> int:
    args = _parser().parse_args()
    rows = measure_rows(args.measure_sizes, args.deltas, args.modes) if args.measure else []
    if args.csv is not None or not args.measure:
        rows += read_rows(args.csv or [str(REPO / "data" / "results" / "table1-latest.csv")])
    rows = [r for r in rows if r["mode"] in args.modes and r["size"] in args.sizes
            and r["delta"] in args.deltas]
    if not rows:
        print("no measured rows")
        return 1
    constants, worst = fit_and_report(rows, args.modes, args.keep)
    print()
    print("constants:")
    for mode in args.modes:
        if mode in worst:
            print(f"  {mode:<16} {constants[mode]}  worst |error| {100 * worst[mode]:.1f} %"
                  f"{' (kept)' if mode in args.keep else ''}")
    if args.write:
        note = (f"fitted {dt.date.today().isoformat()} by benchmarks/calibrate_predictor.py on sizes "
                f"{sorted({r['size'] for r in rows})}, deltas {sorted({r['delta'] for r in rows})}; "
                f"worst |error| " + ", ".join(f"{m} {100 * w:.1f}%" for m, w in worst.items()))
        write_constants(constants, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
