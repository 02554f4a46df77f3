"""How exact are float32 gradients?  Each engine against a float64 reference.

For the Table-1 model (2D iUNet, 64 -> 1024 channels, 4 downsamplings, ``delta`` couplings per
block and side) at ``size x size``, with every parameter moved off the initialisation by
``scale * randn``, one training step is run in float32 with each engine (``conventional``:
plain autograd, ``fused``, ``memcnn``) and in float64 with plain autograd on the *same*
(float32-rounded) parameters and input.  Printed per engine: the relative error
``|g32 - g64| / |g64|`` of every parameter gradient tensor (median, 90th percentile and
maximum over the tensors, and over all parameters together), of the input gradient and of the
output.  The loss is linear in the output, ``sum(y * G) / y.numel()`` with a fixed random
``G``, so that the gradients are well defined at any scale.

Run:  ``.venv/bin/python benchmarks/float32_fidelity.py`` (128^2, delta 5 and 30, scales 0.2
and 1.0; about 10 minutes on one thread).  ``--size 64 --deltas 2`` for a quick look.
The table goes to stdout and to ``data/results/float32-fidelity-<stamp>.csv``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from iunet_nb import iUNet  # noqa: E402

CHANNELS = (64, 128, 256, 512, 1024)
ENGINES = {
    "conventional": dict(disable_custom_gradient=True),
    "fused": dict(me_backend="fused"),
    "memcnn": dict(me_backend="memcnn"),
}
COLUMNS = ["size", "delta", "scale", "engine", "tensors", "median", "p90", "max", "all_params",
           "input_grad", "output", "worst_tensor"]


def build(engine: str, delta: int, dtype: torch.dtype) -> iUNet:
    torch.manual_seed(0)
    model = iUNet(channels=CHANNELS, architecture=[delta] * len(CHANNELS), dim=2, verbose=0,
                  **ENGINES[engine])
    return model.to(dtype)


def perturbed_state(delta: int, scale: float, seed: int = 1) -> dict[str, torch.Tensor]:
    """float32 parameters of the model moved by ``scale * randn`` (buffers as initialised)."""
    model = build("conventional", delta, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def step(engine: str, delta: int, dtype: torch.dtype, state: dict, x: torch.Tensor,
         g: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(parameter gradients, input gradient, output) of one step, in the step's dtype."""
    model = build(engine, delta, dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    xin = x.to(dtype, copy=True).requires_grad_(True)
    y = model(xin)
    loss = (y * g.to(dtype)).sum() / y.numel()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out = (grads, xin.grad, y.detach())
    del model, y, loss
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius); ``inf`` where ``b`` vanishes but ``a`` does not."""
    a, b = a.double(), b.double()
    nb = b.norm().item()
    d = (a - b).norm().item()
    return d / nb if nb > 0 else (0.0 if d == 0 else float("inf"))


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def measure(size: int, delta: int, scale: float, engines: list[str]) -> list[dict]:
    state = perturbed_state(delta, scale)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, CHANNELS[0], size, size, generator=gen)
    g = torch.randn(1, CHANNELS[0], size, size, generator=gen)
    ref_grads, ref_dx, ref_y = step("conventional", delta, torch.float64, state, x, g)
    rows = []
    for engine in engines:
        grads, dx, y = step(engine, delta, torch.float32, state, x, g)
        errs = {n: rel(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
        missing = sorted(set(ref_grads) - set(grads))
        if missing:
            raise RuntimeError(f"{engine}: no gradient for {missing[:3]} ...")
        # over all parameters together, without concatenating them (memory)
        num = sum((grads[n].double() - ref_grads[n]).square().sum().item() for n in ref_grads)
        den = sum(ref_grads[n].square().sum().item() for n in ref_grads)
        worst = max(errs, key=errs.get)
        rows.append(dict(size=size, delta=delta, scale=scale, engine=engine, tensors=len(errs),
                         median=statistics.median(errs.values()), p90=quantile(list(errs.values()), 0.9),
                         max=errs[worst], all_params=(num / den) ** 0.5, input_grad=rel(dx, ref_dx),
                         output=rel(y, ref_y), worst_tensor=worst))
        del grads, dx, y
    return rows


def format_table(rows: list[dict]) -> str:
    hdr = (f"{'size':>5} {'delta':>5} {'scale':>5} {'engine':<13} {'median':>9} {'p90':>9} {'max':>9} "
           f"{'all params':>10} {'input grad':>10} {'output':>9}  worst tensor")
    lines = ["Relative error of float32 gradients against float64 (plain autograd, same parameters), "
             "per parameter tensor", hdr, "-" * len(hdr)]
    for r in rows:
        lines.append(f"{r['size']:>5} {r['delta']:>5} {r['scale']:>5} {r['engine']:<13} {r['median']:>9.1e} "
                     f"{r['p90']:>9.1e} {r['max']:>9.1e} {r['all_params']:>10.1e} {r['input_grad']:>10.1e} "
                     f"{r['output']:>9.1e}  {r['worst_tensor']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--deltas", type=int, nargs="+", default=[5, 30])
    ap.add_argument("--scales", type=float, nargs="+", default=[0.2, 1.0])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--out", default=str(REPO / "data" / "results"),
                    help="directory for the CSV ('' to write none)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.size < 16:
        ap.error(f"--size must be >= 16 (the model downsamples 4 times), got {args.size}")
    if min(args.deltas) < 1:
        ap.error(f"--deltas must be >= 1, got {args.deltas}")
    if min(args.scales) < 0:
        ap.error(f"--scales must be >= 0, got {args.scales}")
    torch.set_num_threads(1)
    rows: list[dict] = []
    configs = [(d, s) for d in args.deltas for s in args.scales]
    for delta, scale in tqdm(configs, desc="fidelity", disable=args.no_progress, file=sys.stderr):
        rows += measure(args.size, delta, scale, args.engines)
    print(format_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"float32-fidelity-{dt.datetime.now():%Y%m%d-%H%M%S}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
