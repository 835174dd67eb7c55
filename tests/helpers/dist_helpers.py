"""Run a function on several real processes joined in a gloo process group (CPU), and collect what each returns.

Each rank writes its JSON-able result to ``folder/rank<r>.json``; nothing is pickled back from the children.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, folder: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable, world: int, folder: Path, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns their results in rank order.

    ``fn`` must be a module-level function of a test module (spawn imports it by name).
    """
    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(fn, world, _free_port(), str(folder), args), nprocs=world, join=True)
    return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]
