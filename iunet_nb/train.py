"""The one training loop: ``python -m iunet_nb.train TASK [--options]``.

A *task* (``ct``, ``segmentation3d``, ``flow``; see :mod:`iunet_nb.apps`)
supplies data, model, loss and metrics; this module supplies everything else:

- one process or many: under ``torchrun`` (``WORLD_SIZE`` > 1 in the
  environment) the loop joins the process group (NCCL on CUDA, gloo on CPU),
  wraps the model in ``DistributedDataParallel`` and splits every global batch
  of ``--batch-size`` samples over the processes with a ``DistributedSampler``,
  so that one step sees the same samples, whatever the number of processes;
- a checkpoint written atomically at the end of every epoch (temporary file,
  then ``os.replace``), loadable with ``torch.load(..., weights_only=True)``:
  model, optimiser, epoch, step, options, metrics and the random states of
  every process (as tensors);
- ``--resume`` continues *exactly*: the same random streams and the same next
  batch as the run that was interrupted;
- ``metrics.csv`` (one row per epoch: train loss, the task's validation
  metrics, seconds) and a ``tqdm`` bar (:func:`iunet_nb.notebook.helpers.progress`),
  on rank 0 only.

Python API (what the notebooks call)::

    from iunet_nb.train import train
    run = train("ct", epochs=3, batch_size=8, arch="iunet", progress=False)
    run.history[-1]["psnr"], run.model

Command line::

    python -m iunet_nb.train ct --epochs 3 --out runs/ct
    torchrun --nproc_per_node=2 -m iunet_nb.train ct --epochs 3 --out runs/ct
    python -m iunet_nb.train ct --epochs 5 --out runs/ct --resume    # two more epochs
    python -m iunet_nb.train sweep segmentation3d --reduced          # quality against memory

``sweep TASK`` (:mod:`iunet_nb.apps.sweep`): both networks at several widths spanning the same
measured training memory, each trained over seeds to a plateau; :func:`run_sweep` is its API.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from iunet_nb.apps import TASK_MODULES, get_task
from iunet_nb.apps.robust import Plateau, Spread, Stopped, seed_spread
from iunet_nb.apps.task import ENGINES, Task, non_negative_int, positive_int
from iunet_nb.notebook.helpers import in_jupyter_kernel, progress, seed_everything

__all__ = ["train", "train_over_seeds", "run_sweep", "Run", "build_parser", "parse_options", "load_checkpoint", "main",
           "CHECKPOINT_NAME", "METRICS_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
_FORMAT = "iunet_nb.train/1"
#: options that may change between a run and its resumption (they do not change what is computed)
_MAY_CHANGE_ON_RESUME = ("epochs", "out", "resume", "workers", "progress", "device", "threads")
#: environment variable for the tests: the process SIGKILLs itself before this global step
#: (only in the first attempt of a torchrun job, so that ``--max-restarts`` can resume it)
_KILL_ENV = "IUNET_NB_TRAIN_KILL_AT_STEP"


@dataclass
class Run:
    """What :func:`train` returns.

    Attributes:
        task: the task's name.
        model: the trained model (not wrapped in ``DistributedDataParallel``), on the run's device.
        history: one dict per epoch: ``epoch``, ``step``, ``train_loss``, the task's metrics, ``seconds``.
        options: the options of the run (a plain dict).
        out: the output folder (``checkpoint.pt``, ``metrics.csv``), or ``None`` if nothing was written.
        stopped: why a run with a ``stop`` rule ended (:class:`~iunet_nb.apps.robust.Stopped`);
            ``None`` without one, or when ``--epochs`` ended it first.
    """

    task: str
    model: nn.Module
    history: list[dict[str, float]]
    options: dict[str, Any]
    out: Path | None
    stopped: Stopped | None = None


# ---------------------------------------------------------------------------------------------- options
def _positive_float(text: Any) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _device_name(text: Any) -> str:
    text = str(text)
    if text in ("auto", "cpu") or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}")


def build_parser(task: Task) -> argparse.ArgumentParser:
    """The command-line parser: the loop's options, then the task's (``task.add_arguments``)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m iunet_nb.train {task.name}", description=task.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loop = parser.add_argument_group("training loop")
    loop.add_argument("--epochs", type=positive_int, default=2, help="total number of epochs")
    loop.add_argument("--batch-size", type=positive_int, default=8,
                      help="global batch size: split evenly over the processes")
    loop.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    loop.add_argument("--seed", type=non_negative_int, default=0,
                      help="seed of the data, the initialisation and every random stream")
    loop.add_argument("--device", type=_device_name, default="auto",
                      help="auto (cuda if available), cpu, cuda or cuda:N; under torchrun cuda means "
                           "cuda:LOCAL_RANK")
    loop.add_argument("--engine", choices=ENGINES, default="fused",
                      help="backward of the iUNets: memory-efficient (fused, memcnn) or conventional")
    loop.add_argument("--out", default=str(Path("runs") / task.name),
                      help="folder for checkpoint.pt and metrics.csv")
    loop.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                      help="continue from CHECKPOINT; without a value: OUT/checkpoint.pt if it exists "
                           "(else start afresh)")
    loop.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    loop.add_argument("--threads", type=non_negative_int, default=0,
                      help="torch.set_num_threads per process (0: leave the default)")
    loop.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="progress bar and one line per epoch (rank 0)")
    before = {a.dest for a in parser._actions}
    task.add_arguments(parser)
    parser.set_defaults(_task_options=sorted({a.dest for a in parser._actions} - before))
    return parser


def parse_options(task: Task, argv: Sequence[str] = (), **options: Any) -> argparse.Namespace:
    """Parse ``argv`` as the command line would, then apply keyword ``options``.

    Keyword options use the attribute names (``batch_size=8``, not ``--batch-size``) and are
    checked like the command line (types, choices); unknown names are a ``TypeError`` that lists
    the valid ones.
    """
    parser = build_parser(task)
    opts = parser.parse_args(list(argv))
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help",)}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for task {task.name!r}; valid options: "
                        f"{sorted(actions)}")
    for name, value in options.items():
        setattr(opts, name, _coerce(actions[name], name, value))
    return opts


def _coerce(action: argparse.Action, name: str, value: Any) -> Any:
    """``value`` checked and converted as argparse would convert a command-line string."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise TypeError(f"option {name} must be True or False, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if many and not isinstance(value, (list, tuple)):
        raise TypeError(f"option {name} takes a list, got {value!r}")
    converted = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"option {name} got a bool ({item!r}); expected {action.metavar or name}")
        try:
            item = action.type(item) if action.type is not None else item
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise ValueError(f"option {name}: {err}") from None
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"option {name} must be one of {list(action.choices)}, got {item!r}")
        converted.append(item)
    if isinstance(action.nargs, int) and len(converted) != action.nargs:
        raise ValueError(f"option {name} takes {action.nargs} values, got {len(converted)}")
    return converted if many else converted[0]


def _options_dict(opts: argparse.Namespace) -> dict[str, Any]:
    """The options as JSON-like primitives (tuples -> lists, paths -> str), for checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)
    return {k: plain(v) for k, v in sorted(vars(opts).items()) if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class _Processes:
    rank: int
    world: int
    local_rank: int
    owns_group: bool  # we initialised the process group, so we tear it down


def _join_processes(device_type: str) -> _Processes:
    """Join the process group torchrun prepared (``WORLD_SIZE`` > 1), or run alone."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return _Processes(dist.get_rank(), dist.get_world_size(), local_rank, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Processes(0, 1, 0, False)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return _Processes(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _resolve_device(name: str, local_rank: int, world: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available here; use --device auto or cpu")
        if name == "cuda":
            name = f"cuda:{local_rank if world > 1 else torch.cuda.current_device()}"
        device = torch.device(name)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- random states
def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """Every random stream of this process, as tensors (``weights_only``-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
        "python": torch.tensor([version, *internal], dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"])))
    version, *internal = (int(v) for v in state["python"])
    has_py_gauss, py_gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(internal), py_gauss if has_py_gauss else None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _derived_seed(*numbers: int) -> int:
    """A 63-bit seed derived from ``numbers`` (independent streams per process and epoch)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers: seed NumPy (torch and ``random`` are seeded by the DataLoader)."""
    np.random.seed(torch.initial_seed() % 2**32)


# ---------------------------------------------------------------------------------------------- files
def _write_atomically(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file next to ``path``, flushed to disk, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _metrics_csv(history: list[dict[str, float]]) -> bytes:
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue().encode()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this loop with ``torch.load(..., weights_only=True)`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by iunet_nb.train "
                         f"(format {_FORMAT!r})")
    return ckpt


def _check_resumable(ckpt: dict[str, Any], path: Path, task: Task, opts: argparse.Namespace) -> None:
    """Clear errors when a checkpoint belongs to another task or to other options."""
    if ckpt["task"] != task.name:
        raise ValueError(f"checkpoint {str(path)!r} was written by task {ckpt['task']!r}, not "
                         f"{task.name!r}; use another --out or --resume path")
    old, new = ckpt["options"], _options_dict(opts)
    diffs = [k for k in sorted(set(old) | set(new))
             if k not in _MAY_CHANGE_ON_RESUME and old.get(k) != new.get(k)]
    if diffs:
        detail = "; ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in diffs)
        raise ValueError(f"checkpoint {str(path)!r} was trained with other options ({detail}). "
                         f"Resume with the same options (only {', '.join(_MAY_CHANGE_ON_RESUME)} may "
                         "change), or start afresh in another --out folder")
    if ckpt["epoch"] > opts.epochs:
        raise ValueError(f"checkpoint {str(path)!r} has already trained {ckpt['epoch']} epochs; "
                         f"--epochs {opts.epochs} is fewer (pass --epochs >= {ckpt['epoch']})")


def _load_model_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {str(path)!r} holds another model than {type(model).__name__} "
                         f"built from these options: {str(err).splitlines()[0]} ...") from None


def _checkpoint_path(opts: argparse.Namespace, out: Path | None) -> Path | None:
    """The checkpoint to resume from, or None to start afresh."""
    if opts.resume is None:
        return None
    if opts.resume != "auto":
        return Path(opts.resume)
    if out is None:
        raise ValueError("resume='auto' needs an output folder (out=...) to look for checkpoint.pt in")
    path = out / CHECKPOINT_NAME
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------- the loop
def _mean_over_processes(total: float, count: int, device: torch.device, world: int) -> float:
    if world > 1:
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def _loaders(task: Task, opts: argparse.Namespace, procs: _Processes, device: torch.device
             ) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    if opts.batch_size % procs.world:
        raise ValueError(f"--batch-size {opts.batch_size} (global) must be divisible by the number of "
                         f"processes ({procs.world}); e.g. --batch-size "
                         f"{max(procs.world, opts.batch_size // procs.world * procs.world)}")
    seed_everything(opts.seed)
    train_set, val_set = task.datasets(opts)
    per_process = opts.batch_size // procs.world
    if len(train_set) < opts.batch_size:
        raise ValueError(f"--batch-size {opts.batch_size} exceeds the {len(train_set)} training samples "
                         f"of task {task.name!r}")
    # drop_last in both: every step sees a full global batch, the same samples for any world size.
    sampler = DistributedSampler(train_set, num_replicas=procs.world, rank=procs.rank, shuffle=True,
                                 seed=opts.seed, drop_last=True)
    common = dict(num_workers=opts.workers, pin_memory=device.type == "cuda",
                  worker_init_fn=_seed_worker if opts.workers else None)
    train_loader = DataLoader(train_set, batch_size=per_process, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_set, batch_size=per_process, shuffle=False, **common)
    return train_loader, sampler, val_loader


def _train_epoch(task: Task, wrapped: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 device: torch.device, step: int, bar: Any) -> tuple[float, int, int]:
    """One pass over ``loader``; returns (sum of the batch losses, number of batches, global step)."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    kill_at = int(os.environ.get(_KILL_ENV, "-1")) if first_attempt else -1
    total, count = 0.0, 0
    for batch in loader:
        if step == kill_at:  # tests: die like a killed job, without any clean-up
            os.kill(os.getpid(), signal.SIGKILL)
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(wrapped, batch)
        if loss.dim() != 0:
            raise ValueError(f"task {task.name!r}: loss must be a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"task {task.name!r}: the training loss is {value} at step {step}; "
                                     "try a smaller --lr")
        total, count, step = total + value, count + 1, step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return total, count, step


def _evaluate(task: Task, model: nn.Module, loader: DataLoader, procs: _Processes) -> dict[str, float]:
    """The task's metrics, computed on rank 0 and shared with every process."""
    metrics: list[Any] = [None]
    if procs.rank == 0:
        model.eval()
        with torch.no_grad():
            metrics[0] = {k: float(v) for k, v in task.evaluate(model, loader).items()}
        model.train()
    if procs.world > 1:
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0]


def _model_and_optimizer(task: Task, opts: argparse.Namespace, procs: _Processes, device: torch.device,
                         ckpt: dict | None, resume_from: Path | None
                         ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """``(model, model as trained, Adam)``: the model, in several processes wrapped in
    ``DistributedDataParallel``, with the checkpoint's states when resuming."""
    seed_everything(opts.seed)  # the same initialisation in every process
    model = task.model(opts).to(device)
    if ckpt is not None:
        _load_model_state(model, ckpt["model"], resume_from)
    wrapped = model
    if procs.world > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                          else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return model, wrapped, optimizer


def _seed_streams(opts: argparse.Namespace, procs: _Processes, device: torch.device, ckpt: dict | None) -> None:
    """One random stream per process: the checkpoint's when it was written by as many processes,
    else derived from ``--seed`` (and the epoch when resuming)."""
    if ckpt is None:
        seed_everything(_derived_seed(opts.seed, procs.rank))
    elif ckpt["world_size"] == procs.world:
        _set_rng_state(ckpt["rng"][procs.rank], device)
    else:
        warnings.warn(f"checkpoint written by {ckpt['world_size']} processes, resumed by "
                      f"{procs.world}: the random streams restart from --seed", stacklevel=3)
        seed_everything(_derived_seed(opts.seed, ckpt["epoch"], procs.rank))


def run_training(task: Task, opts: argparse.Namespace,
                 stop: Callable[[list[dict[str, float]]], Stopped | None] | None = None) -> Run:
    """Train ``task`` with parsed options ``opts`` (see :func:`train`); ``stop(history)`` after every epoch."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    wanted = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    procs = _join_processes("cuda" if wanted.startswith("cuda") else "cpu")
    try:
        device = _resolve_device(opts.device, procs.local_rank, procs.world)
        out = Path(opts.out) if opts.out is not None else None
        resume_from = _checkpoint_path(opts, out)
        ckpt = load_checkpoint(resume_from) if resume_from is not None else None
        if ckpt is not None:
            _check_resumable(ckpt, resume_from, task, opts)
        train_loader, sampler, val_loader = _loaders(task, opts, procs, device)

        model, wrapped, optimizer = _model_and_optimizer(task, opts, procs, device, ckpt, resume_from)
        _seed_streams(opts, procs, device, ckpt)
        epoch, step = (ckpt["epoch"], ckpt["step"]) if ckpt is not None else (0, 0)
        history = [dict(row) for row in ckpt["history"]] if ckpt is not None else []
        if out is not None and procs.rank == 0:
            out.mkdir(parents=True, exist_ok=True)

        show = opts.progress and procs.rank == 0
        if show and ckpt is not None:
            print(f"resuming from {resume_from} after epoch {epoch} (step {step})", flush=True)
        # a text bar on a terminal; in a notebook one line that keeps its final state when saved
        bar = progress(total=(opts.epochs - epoch) * len(train_loader), desc=task.name, enable=show)
        log_epochs = show and not in_jupyter_kernel()  # notebooks plot the history instead
        stopped = stop(history) if stop is not None and history else None  # a resumed run may be done
        while epoch < opts.epochs and stopped is None:
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            wrapped.train()
            total, count, step = _train_epoch(task, wrapped, optimizer, train_loader, device, step, bar)
            train_loss = _mean_over_processes(total, count, device, procs.world)
            metrics = _evaluate(task, model, val_loader, procs)
            epoch += 1
            row = {"epoch": epoch, "step": step, "train_loss": train_loss, **metrics,
                   "seconds": time.perf_counter() - start}
            history.append(row)
            if log_epochs:
                bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()))
            _save(out, task, model, optimizer, epoch, step, opts, history, procs, device)
            stopped = stop(history) if stop is not None else None
            if stopped is not None and log_epochs:
                bar.write(f"stopped after epoch {epoch}: {stopped.message}")
        bar.close()
        return Run(task.name, model, history, _options_dict(opts), out, stopped)
    finally:
        if procs.owns_group:
            dist.destroy_process_group()


def _save(out: Path | None, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
          step: int, opts: argparse.Namespace, history: list[dict], procs: _Processes,
          device: torch.device) -> None:
    """Checkpoint (every process's random state gathered) and metrics CSV, written by rank 0."""
    if out is None:
        return
    states: list[Any] = [None] * procs.world
    if procs.world > 1:
        dist.all_gather_object(states, _rng_state(device))
    else:
        states[0] = _rng_state(device)
    if procs.rank == 0:
        ckpt = {"format": _FORMAT, "task": task.name, "model_class": type(model).__name__,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "sampler_epoch": epoch, "world_size": procs.world, "rng": states,
                "options": _options_dict(opts), "history": history}
        _write_atomically(out / CHECKPOINT_NAME, lambda f: torch.save(ckpt, f))
        _write_atomically(out / METRICS_NAME, lambda f: f.write(_metrics_csv(history)))
    if procs.world > 1:
        dist.barrier()


def train(task: str | Task, argv: Sequence[str] = (),
          stop: Callable[[list[dict[str, float]]], Stopped | None] | None = None, **options: Any) -> Run:
    """Train a task in this process (or in each process of a ``torchrun`` job); return a :class:`Run`.

    Args:
        task: a task name (one of ``iunet_nb.apps.TASK_MODULES``) or a :class:`~iunet_nb.apps.task.Task`.
        argv: command-line style options, parsed first (e.g. ``["--epochs", "3"]``).
        stop: called with the history after every epoch; training ends when it returns a
            :class:`~iunet_nb.apps.robust.Stopped` (e.g. a :class:`~iunet_nb.apps.robust.Plateau`),
            or after ``epochs`` epochs. With a ``Plateau`` and no ``epochs`` given, ``epochs`` is
            its ``max_epochs``.
        **options: options by attribute name, e.g. ``epochs=3, batch_size=8, lr=1e-3, seed=0,
            device='auto', engine='fused', out='runs/ct', resume='auto', progress=False`` and the
            task's own. Unlike the command line, nothing is written unless ``out`` is given.

    Returns:
        The trained model and the per-epoch history (also in ``OUT/metrics.csv``).
    """
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(task, Task):
        raise TypeError(f"task must be a task name {sorted(TASK_MODULES)} or a Task, got {task!r}")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be a callable of the history (e.g. a Plateau), got stop={stop!r}")
    given_epochs = "epochs" in options or any(a == "--epochs" or a.startswith("--epochs=") for a in argv)
    if isinstance(stop, Plateau) and not given_epochs:
        options = {**options, "epochs": stop.max_epochs}
    opts = parse_options(task, argv, **options)
    if "out" not in options and not any(a == "--out" or a.startswith("--out=") for a in argv):
        opts.out = None  # the function writes files only when asked to
    return run_training(task, opts, stop)


def train_over_seeds(task: str | Task, seeds: int | Sequence[int] = 3,
                     stop: Callable[[list[dict[str, float]]], Stopped | None] | None = None,
                     **options: Any) -> dict[str, Spread]:
    """:func:`train` once per seed (``int k``: seeds ``0..k-1``); the spread of the final epoch's numbers.

    Returns a :class:`~iunet_nb.apps.robust.Spread` (mean, sample std, per-seed values) for
    ``epoch`` (epochs trained, which a ``stop`` rule may vary), ``train_loss`` and every metric
    of the task, all of the *last* epoch (the model a run returns). With ``out``, seed ``s``
    writes into ``OUT/seed{s}``.
    """
    if "seed" in options:
        raise TypeError("train_over_seeds sets seed itself; pass seeds=... instead of seed=...")
    out = options.pop("out", None)

    def one(seed: int) -> dict[str, float]:
        where = {} if out is None else {"out": str(Path(out) / f"seed{seed}")}
        run = train(task, stop=stop, seed=seed, **where, **options)
        return {k: float(v) for k, v in run.history[-1].items() if k not in ("step", "seconds")}

    return seed_spread(one, seeds)


def run_sweep(task: str, configs: Sequence[Any], seeds: int | Sequence[int] = 3,
              stop: Callable[[list[dict[str, float]]], Stopped | None] | None = None, **kwargs: Any
              ) -> list[dict[str, Any]]:
    """:func:`iunet_nb.apps.sweep.run_sweep` with :func:`train_over_seeds` as its trainer: every
    configuration of :func:`iunet_nb.apps.sweep.plan_sweep` trained over seeds, one row per metric
    ``{"network", "config", "peak_mib", "metric", "mean", "std"}``."""
    from iunet_nb.apps.sweep import run_sweep as _run_sweep

    return _run_sweep(task, configs, seeds, stop, trainer=train_over_seeds, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m iunet_nb.train TASK [--options]``; ``--help`` after TASK lists its options.

    ``python -m iunet_nb.train sweep TASK [--reduced] [--seeds N] [--out DIR]``: the sweep of
    :mod:`iunet_nb.apps.sweep`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (f"usage: python -m iunet_nb.train TASK [--options]   (TASK: {', '.join(TASK_MODULES)}; "
             "python -m iunet_nb.train TASK --help lists the options)\n"
             "       python -m iunet_nb.train sweep TASK [--reduced] [--seeds N] [--out DIR]")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    name = argv[0]
    if name == "sweep":
        from iunet_nb.apps.sweep import sweep_cli

        try:
            return sweep_cli(argv[1:], trainer=train_over_seeds)
        except (ValueError, FileNotFoundError) as err:
            print(f"python -m iunet_nb.train sweep: error: {err}", file=sys.stderr)
            return 2
    if name not in TASK_MODULES:
        print(f"{usage}\nerror: unknown task {name!r}", file=sys.stderr)
        return 2
    task = get_task(name)
    opts = build_parser(task).parse_args(argv[1:])
    try:
        run_training(task, opts)
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m iunet_nb.train {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
