"""Step time of the fused and memcnn engines vs conventional backprop, side by side.

64-channel 2D iUNet, 4 downsamplings (channels doubling per level), delta coupling
layers per block, one thread.  Engines are interleaved in each round so that the
machine's drift affects them alike; the median over rounds is reported.  Each engine is
timed with each loss of ``--losses``: ``torch`` is the loss a user writes
(``y.square().mean()``), ``mean_square`` the project's meter loss
(:func:`iunet_nb.measure.meter.mean_square`, whose backward allocates only ``dL/dy``).

    python benchmarks/engine_speed.py --size 128 --delta 5 --rounds 5 --losses torch mean_square
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from iunet_nb.arch.iunet import iUNet
from iunet_nb.measure.meter import mean_square

MODES = ("conventional", "fused", "memcnn")


def build(delta: int, mode: str) -> iUNet:
    torch.manual_seed(0)
    return iUNet(
        channels=(64, 128, 256, 512, 1024), architecture=(delta,) * 5, dim=2, verbose=0,
        disable_custom_gradient=(mode == "conventional"),
        me_backend="memcnn" if mode == "memcnn" else "fused",
    )


LOSSES = {
    "torch": lambda y: y.square().mean(),
    "mean_square": mean_square,
}


def step(model: iUNet, x: torch.Tensor, loss: str = "torch") -> float:
    """Seconds of one training step (forward, loss, backward) with the loss ``loss``."""
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    y = model(x)
    LOSSES[loss](y).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--delta", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--losses", nargs="+", default=["torch"], choices=sorted(LOSSES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {m: build(args.delta, m) for m in args.modes}
    # Same weights everywhere (random, so that no coupling is the identity).
    ref = models[args.modes[0]]
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for m in models.values():
        m.load_state_dict(ref.state_dict())
    x = torch.randn(1, 64, args.size, args.size)
    runs = [(m, loss) for loss in args.losses for m in models]
    for m, loss in runs:  # warm-up
        step(models[m], x, loss)
    times: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    for _ in range(args.rounds):
        for m, loss in runs:
            times[(m, loss)].append(step(models[m], x, loss))
    print(f"iUNet 64ch 2D, 4 downsamplings, delta={args.delta}, {args.size}x{args.size}, "
          f"threads={args.threads}, median of {args.rounds} interleaved rounds")
    for (name, loss), ts in times.items():
        med = statistics.median(ts)
        conv = times.get(("conventional", loss))
        ratio = f"{med / statistics.median(conv):6.3f}x conventional" if conv else ""
        print(f"  {name:13s} {loss:12s} {med:8.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})  {ratio}")


if __name__ == "__main__":
    main()
