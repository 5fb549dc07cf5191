"""Scaling out on PyTorch's own machinery: torchrun's environment, shards of the clip list, DDP training.

Extraction needs no communication: each rank (or each `--shard I/N` job of a cluster scheduler) extracts the
clips whose id hashes to its shard into its own store file, and `bmfn merge` joins the files. Training wraps
the model in DistributedDataParallel; every rank takes a disjoint slice of each global batch, so the result
matches single-process training with the same `--batch-size` (see `local_batch` and `SyncBatchNorm2d`), and
predicts its share of val and test after each epoch (`rank_share`, `summed`).
Multi-node runs use torchrun's usual rendezvous; nothing here depends on how the ranks were started.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bmfn_pipeline.errors import BmfnError
from bmfn_pipeline.store import MergeSummary, merge_stores

# The environment variables torchrun sets in every worker (torch.distributed.run).
RANK_VAR, WORLD_SIZE_VAR, LOCAL_RANK_VAR = "RANK", "WORLD_SIZE", "LOCAL_RANK"
# Shard files: `feats.h5` -> `feats.shard-00001-of-00004.h5` (0-based index, like torchrun's RANK).
SHARD_DIGITS = 5
SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)(?P<suffix>(\.[^.]*)?)$")
# How long ranks that finished extracting wait for the slowest one (torchrun stops every rank when one exits),
# and how long they wait for each other at the start.
FINISH_TIMEOUT = timedelta(hours=48)
JOIN_TIMEOUT = timedelta(minutes=30)
_extracting_together = False  # start_together joined a process group that finish_together ends
_running_stand_in = False  # this rank runs local_batch's stand-in row now (see stand_in)

T = TypeVar("T")


@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun launch; rank 0 of 1 when started otherwise."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and logs."""
        return self.rank == 0


def rank_env() -> RankEnv:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them (also across nodes)."""
    try:
        env = RankEnv(int(os.environ.get(RANK_VAR, 0)), int(os.environ.get(WORLD_SIZE_VAR, 1)),
                      int(os.environ.get(LOCAL_RANK_VAR, 0)))
    except ValueError:
        raise BmfnError(f"{RANK_VAR}/{WORLD_SIZE_VAR}/{LOCAL_RANK_VAR} must be integers, "
                        "as torchrun sets them") from None
    if not 0 <= env.rank < env.world_size:
        raise BmfnError(f"{RANK_VAR}={env.rank} is outside {WORLD_SIZE_VAR}={env.world_size}")
    return env


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; 'cpu', 'cuda' and 'cuda:N' are checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise BmfnError(f"device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise BmfnError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BmfnError(f"device {device}: no CUDA device is available here (use --device cpu)")
    return resolved


def rank_device(device: torch.device) -> torch.device:
    """`cuda` becomes this rank's GPU, cuda:LOCAL_RANK, under torchrun; an explicit index is kept."""
    if device.type == "cuda" and device.index is None and rank_env().world_size > 1:
        return torch.device("cuda", rank_env().local_rank)
    return device


# ---------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the clips whose id hashes to `index`, whichever clips exist."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise BmfnError(f"shard {self.index}/{self.count}: the number of shards must be 1 or more")
        if not 0 <= self.index < self.count:
            raise BmfnError(f"shard {self.index}/{self.count}: the index must be 0..{self.count - 1}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'I/N', as `--shard` takes it."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise BmfnError(f"--shard {text!r}: write I/N, e.g. 0/4 for the first of four shards")
        return cls(int(match[1]), int(match[2]))

    def holds(self, clip_id: str) -> bool:
        return shard_of(clip_id, self.count) == self.index

    def path(self, out: str | os.PathLike) -> Path:
        """This shard's store file beside `out`."""
        out = Path(out)
        return out.with_name(f"{out.stem}.shard-{self.index:0{SHARD_DIGITS}d}-of-{self.count:0{SHARD_DIGITS}d}"
                             f"{out.suffix}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def shard_of(clip_id: str, count: int) -> int:
    """A clip's shard by SHA-1 of its id: stable across reruns and machines, independent of the other clips."""
    return int(hashlib.sha1(clip_id.encode("utf-8")).hexdigest()[:16], 16) % count


def resolve_shard(shard: Shard | None) -> Shard | None:
    """The shard to extract: `--shard`, else RANK/WORLD_SIZE under torchrun, else None (everything)."""
    env = rank_env()
    if env.world_size == 1:
        return shard
    if shard is not None:
        raise BmfnError(f"--shard {shard} under torchrun ({WORLD_SIZE_VAR}={env.world_size}): "
                        "the ranks already choose the shards; drop --shard or torchrun")
    return Shard(env.rank, env.world_size)


def missing_shards(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Shard files absent from `paths` among those their names announce (`*.shard-I-of-N.*`). The shards of a run
    are known by their names wherever each file lies (a multi-node run's shards may come from each machine's own
    disk, in folders of their own); a missing one is named in the others' folder where they share one. Where one
    shard name stands in several folders, they hold several runs' shards: each folder must then be whole."""
    groups: dict[tuple[str, int, str], dict[Path, set[int]]] = {}
    for path in map(Path, paths):
        match = SHARD_NAME.match(path.name)
        if match:
            folders = groups.setdefault((match["stem"], int(match["count"]), match["suffix"]), {})
            # absolute: however each path is spelled
            folders.setdefault(Path(os.path.abspath(path)).parent, set()).add(int(match["index"]))
    missing = []
    for (stem, count, suffix), folders in groups.items():
        present = set().union(*folders.values())
        if sum(map(len, folders.values())) == len(present):  # no shard name twice: one run, wherever its files lie
            runs = [(next(iter(folders)) if len(folders) == 1 else Path(), present)]
        else:
            runs = list(folders.items())
        for folder, present in runs:
            missing += [Shard(i, count).path(folder / f"{stem}{suffix}") for i in range(count) if i not in present]
    return missing


def merge_shards(inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
                 allow_missing: bool = False) -> MergeSummary:
    """`bmfn merge`: refuse a set of shard files with one missing (a lost shard would lose its clips), then merge."""
    inputs = list(inputs)
    missing = missing_shards(inputs)
    if missing and not allow_missing:
        raise BmfnError(f"{missing[0]}: shard file not given ({len(missing)} of the shards missing"
                        f"{_mixed_counts(inputs)}); extract it first, or --allow-missing")
    return merge_stores(inputs, out)


def _mixed_counts(paths: Iterable[str | os.PathLike]) -> str:
    """', the shards given are of runs in 2 and 4 shards' where shards of one name come in several counts (a
    glob that took two runs' shards), else ''."""
    counts: dict[tuple[str, str], set[int]] = {}
    for path in map(Path, paths):
        match = SHARD_NAME.match(path.name)
        if match:
            counts.setdefault((match["stem"], match["suffix"]), set()).add(int(match["count"]))
    mixed = next((sorted(c) for c in counts.values() if len(c) > 1), None)
    return f"; the shards given are of runs in {', '.join(map(str, mixed[:-1]))} and {mixed[-1]} shards" \
        if mixed else ""


def start_together() -> None:
    """Under torchrun, join the ranks' process group before extracting, while every rank is alive: a rank that dies
    later (on another machine, which torchrun does not stop) then ends the others' wait in finish_together at once,
    where a group formed only at the end would wait FINISH_TIMEOUT for it. A no-op otherwise."""
    global _extracting_together
    if rank_env().world_size == 1 or dist.is_initialized():
        return
    _join_group("gloo", JOIN_TIMEOUT)
    _extracting_together = True


def finish_together() -> None:
    """After start_together: wait until every rank has finished extracting, so that a rank ending with failed clips
    (exit code 1) does not make torchrun stop the others half-way; one line if another rank stopped. A no-op
    otherwise."""
    global _extracting_together
    if not _extracting_together:
        return
    try:
        dist.monitored_barrier(timeout=FINISH_TIMEOUT, wait_all_ranks=True)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]  # gloo's: "[file:line] What happened. Advice."
        raise BmfnError(f"rank {dist.get_rank()} finished its shard, but another rank stopped before finishing "
                        f"its own ({reason})") from None
    finally:
        dist.destroy_process_group()
        _extracting_together = False


# ---------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[RankEnv]:
    """The default process group for a torchrun launch (NCCL on CUDA, gloo on CPU), torn down afterwards.

    A no-op with one process, or when the caller has set a group up already.
    """
    env = rank_env()
    if env.world_size == 1 or dist.is_initialized():
        yield env
        return
    if device.type == "cuda":
        torch.cuda.set_device(rank_device(device))
    _join_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield env
    finally:
        # A DistributedDataParallel wrapper lives in a reference cycle, holding the group, until the garbage collector
        # frees it; left to the interpreter's exit, gloo's threads can abort the process there (SIGABRT, "terminate
        # called without an active exception", seen once in CI after a finished run). Freed now, while all is alive.
        gc.collect()
        dist.destroy_process_group()


def _join_group(backend: str, timeout: timedelta | None = None) -> None:
    """init_process_group, its failures in one line: RANK and WORLD_SIZE set without torchrun (no MASTER_ADDR), or
    a rendezvous that cannot be reached."""
    env = rank_env()
    try:
        dist.init_process_group(backend, timeout=timeout)
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise BmfnError(f"rank {env.rank} of {env.world_size} ({RANK_VAR} and {WORLD_SIZE_VAR} are set) cannot join "
                        f"the other ranks: {reason}; start bmfn with torchrun, or unset them") from None


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share_from_main(make: Callable[[], T]) -> T:
    """`make()` on rank 0, its result sent to every rank (e.g. a run folder named by the time); `make()` alone
    with one process."""
    if _world() == 1:
        return make()
    shared: list = [None, None]  # the result, or rank 0's error, which every rank then raises
    failure = None
    if dist.get_rank() == 0:
        try:
            shared[0] = make()
        except Exception as exc:  # any: the other ranks wait for rank 0's word
            failure = exc
            shared[1] = str(exc) if isinstance(exc, BmfnError) else f"rank 0 failed ({type(exc).__name__}: {exc})"
    dist.broadcast_object_list(shared, src=0)
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise BmfnError(shared[1])
    return shared[0]


def gathered(value: T) -> list[T]:
    """`value` of every rank, in rank order, on every rank; [value] with one process."""
    if _world() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """In a process group: `model` with synchronised BatchNorm, in DistributedDataParallel. Else `model` itself.

    `model` is changed in place (its BatchNorm layers), so it stays the module to save and evaluate.
    """
    if _world() == 1:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                parent.add_module(name, SyncBatchNorm2d.from_batchnorm(child))
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_batch(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's contiguous slice of a global batch and the factor its (mean) loss is scaled by.

    DDP averages gradients over ranks; scaling each rank's mean loss by n_rank * world / n_global makes that
    average the gradient of the global batch's mean loss, also when the slices differ in size. A rank whose
    slice is empty (a last batch smaller than the world) runs one stand-in row with weight 0, because every
    rank must take part in each backward pass; its forward runs under `stand_in(True)`, so that the row stays
    out of the BatchNorm statistics too (weight 0).
    """
    world = _world()
    if world == 1:
        return batch, 1.0
    rank = dist.get_rank()
    n = len(next(iter(batch.values())))
    lo, hi = n * rank // world, n * (rank + 1) // world
    weight = (hi - lo) * world / n
    if hi == lo:
        lo, hi = 0, 1
    return {name: value[lo:hi] for name, value in batch.items()}, weight


@contextlib.contextmanager
def stand_in(active: bool) -> Iterator[None]:
    """While this rank runs local_batch's stand-in row (`active`: its weight is 0), SyncBatchNorm2d adds nothing
    of it to the global batch's sums and count: the statistics are those of the real rows, as in one process."""
    global _running_stand_in
    _running_stand_in = active
    try:
        yield
    finally:
        _running_stand_in = False


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sums over ranks (epoch totals: loss, correct segments, clips), on the tensor's device (NCCL needs CUDA);
    the tensor itself with one process."""
    if _world() == 1:
        return values
    totals = values.clone()
    dist.all_reduce(totals)
    return totals


def rank_share(rows: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of `rows` (evaluation: each rank predicts its share, then the counts are
    summed); all of them with one process."""
    world = _world()
    return rows if world == 1 else np.array_split(rows, world)[dist.get_rank()]


def summed(values: list[float], device: torch.device) -> list[float]:
    """Each number summed over ranks (exactly, in float64); the numbers themselves with one process."""
    if _world() == 1:
        return values
    return all_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def seed_rank(seed: int, epoch: int) -> None:
    """Distinct dropout masks per rank, reproducible per epoch (so a resumed run continues the same way)."""
    env = rank_env()
    if _world() > 1:
        torch.manual_seed(int(hashlib.sha1(f"{seed}/{epoch}/{env.rank}".encode()).hexdigest()[:15], 16))


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any backend.

    nn.SyncBatchNorm only runs on GPUs; this one reduces sums with torch.distributed.nn's differentiable
    all_reduce, so gradients are those of single-process BatchNorm over the global batch, on gloo (CPU) as
    on NCCL. Its state_dict is BatchNorm2d's: checkpoints load into a plain BMFN.
    """

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> SyncBatchNorm2d:
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device=bn.weight.device if bn.affine else None)
        sync.load_state_dict(bn.state_dict())
        return sync.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        # all_reduce with autograd (sum forward, sum of the gradients backward): what torch.distributed.nn's
        # deprecated all_reduce points to.
        from torch.distributed._functional_collectives import all_reduce

        def total(t: torch.Tensor) -> torch.Tensor:
            return all_reduce(t, "sum", dist.group.WORLD)

        x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics at least in float32, as BatchNorm
        dims = (0, 2, 3)
        share = 0.0 if _running_stand_in else 1.0  # a stand-in row (see stand_in) counts for nothing
        count = total(torch.tensor(share * (x.numel() // x.shape[1]), dtype=x.dtype, device=x.device))
        mean = total(x.sum(dims) * share) / count
        centred = x - mean[None, :, None, None]
        var = total(centred.pow(2).sum(dims) * share) / count  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out
