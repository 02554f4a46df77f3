"""Write ``data/results/index.csv``: one row per results file, what produced it and whether it is cited.

Columns: ``file`` (relative to ``data/results``; a folder counts as one entry), ``kind``,
``command`` (the command line that produced it, reconstructed from the file's own rows where
it records them, else ``unknown``), ``commit`` (the package commit that first added the file),
``machine``, ``date`` (from the run stamp in the name), ``shows`` and ``status``: ``current``
where the README, ``docs/``, ``CHANGELOG.md`` or a notebook names the file, ``superseded``
otherwise (git history keeps every file; a later clean-up may remove superseded ones).

    python benchmarks/results_index.py          # rewrites data/results/index.csv
"""
from __future__ import annotations

import csv
import io
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "data" / "results"
INDEX = RESULTS / "index.csv"
COLUMNS = ["file", "kind", "command", "commit", "machine", "date", "shows", "status"]
CITING = ["README.md", "CHANGELOG.md", "docs", "notebooks"]

#: What each kind of file shows, by the prefix of its name.
SHOWS = {
    "table1-optimizer": "Table 1 model: training step including the optimizer's update",
    "table1-combined": "Table 1 model: several runs merged into one table",
    "table1": "Table 1 model (paper): memory and step time per mode, size and delta",
    "volume3d": "largest trainable 3D volume per mode within a memory budget",
    "calibration": "predictor calibration: measured steps behind iunet_nb.measure.predict",
    "float32-fidelity": "float32 gradient error of each engine against float64 autograd",
    "ownership-side-by-side": "memory before/after the sound-ownership change, side by side",
    "speed-by-loss": "fused/conventional step time with two losses, interleaved",
    "restructure": "memory before/after the package restructuring (folder of runs)",
    "sweep-reduced": "quality against measured training memory, iUNet and U-Net, reduced sweep (folder)",
    "sweep": "quality against measured training memory, iUNet and U-Net, full sweep (folder)",
}


def _kind(name: str) -> str:
    for prefix in sorted(SHOWS, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix
    return "other"


def _date(name: str) -> str:
    m = re.search(r"(20\d{6})(?:-(\d{6}))?", name)
    if not m:
        return "unknown"
    d = m.group(1)
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" + (f" {m.group(2)[:2]}:{m.group(2)[2:4]}" if m.group(2) else "")


def _first_commit(path: Path) -> str:
    out = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", str(path)],
                         cwd=REPO, capture_output=True, text=True).stdout.split()
    return out[-1] if out else "uncommitted"


def _table1_command(path: Path) -> str:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if not rows or "size" not in rows[0]:
        return "unknown"
    pick = lambda key: " ".join(dict.fromkeys(r[key] for r in rows if r.get(key)))  # noqa: E731
    return (f"python -m iunet_nb.bench table1 --size {pick('size')} --deltas {pick('delta')} "
            f"--modes {pick('mode')}")


def _command(path: Path, kind: str) -> str:
    if path.suffix == ".csv" and kind in ("table1", "table1-optimizer") and "latest" not in path.name:
        return _table1_command(path)
    if kind == "speed-by-loss" or kind == "ownership-side-by-side":
        return "see the file's header and docs/results.md"
    return "unknown"


def _folder_command(path: Path, kind: str) -> str:
    if kind == "sweep-reduced":
        return f"python -m iunet_nb.train sweep {path.name.removeprefix('sweep-reduced-')} --reduced"
    if kind == "sweep":
        task = {"sweep-ct": "ct", "sweep-segmentation3d": "segmentation3d"}.get(path.name, "unknown")
        return f"python -m iunet_nb.train sweep {task}"
    return "unknown"


def _machine(path: Path) -> str:
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        devices = sorted({r.get("device", "") for r in rows if r.get("device")})
        if devices:
            return ", ".join(d if d != "cpu" else "cpu (2-core VM, one thread)" for d in devices)
    return "cpu (2-core VM)"


def _citing_text() -> str:
    """The text of every file that may cite a result (read once per index)."""
    texts = []
    for entry in CITING:
        target = REPO / entry
        files = [target] if target.is_file() else sorted(target.rglob("*")) if target.exists() else []
        texts += [f.read_text(errors="ignore") for f in files if f.is_file() and f.suffix in (".md", ".ipynb")]
    return "\n".join(texts)


def entries() -> list[Path]:
    """The results files and folders the index must list (not the index itself)."""
    return sorted(p for p in RESULTS.iterdir() if p.name != INDEX.name and not p.name.startswith("."))


def build() -> list[dict[str, str]]:
    citing, rows = _citing_text(), []
    for path in entries():
        kind = _kind(path.name)
        rows.append(dict(file=path.name + ("/" if path.is_dir() else ""), kind=kind,
                         command=_command(path, kind) if path.is_file() else _folder_command(path, kind),
                         commit=_first_commit(path), machine=_machine(path) if path.is_file() else "cpu (2-core VM)",
                         date=_date(path.name), shows=SHOWS.get(kind, "unknown"),
                         status="current" if path.name in citing else "superseded"))
    return rows


def main() -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(build())
    tmp = INDEX.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue())
    tmp.replace(INDEX)  # never a half-written index
    print(f"{INDEX.relative_to(REPO)}: {len(entries())} entries")


if __name__ == "__main__":
    main()
