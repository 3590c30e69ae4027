"""This training process within a torchrun group (or alone): its rank, the group size, its device, and the data
loader and progress bar that depend on them."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm


@dataclass
class Worker:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_worker(threads: int | None) -> Worker:
    """Join the torchrun process group when launched by torchrun; pick the device once."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Worker(rank, world, device)


SINGLE_CPU = Worker(0, 1, torch.device("cpu"))  # one process on the CPU (the audit's Shield retraining, tests)


def data_loader(dataset: Dataset, batch_size: int, worker: Worker, epoch: int, seed: int) -> DataLoader:
    """Shuffled batches, seeded per epoch; each rank reads its own shard under torchrun."""
    sampler = DistributedSampler(dataset, worker.world, worker.rank, shuffle=True, seed=seed) if worker.world > 1 \
        else None
    if sampler is not None:
        sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(seed + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator, drop_last=len(dataset) > batch_size * worker.world)


def progress(iterable, worker: Worker, desc: str):
    return tqdm(iterable, desc=desc, disable=not worker.main, mininterval=1 if sys.stderr.isatty() else 30,
                dynamic_ncols=True, leave=False)
