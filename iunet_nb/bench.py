"""``python -m iunet_nb.bench``: the benchmark command line.

The code lives in :mod:`iunet_nb.measure.bench`; this module only keeps the
short command ``python -m iunet_nb.bench table1 ...`` working.
"""

from iunet_nb.measure.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
