"""Run under ``deepspeed --num_gpus N``: joins the process group through swinv2's ``init_distributed``, all-reduces
once (and once through DeepSpeed's inference all-reduce, the one caller of its shared-memory op), and prints one JSON
line per rank with what it saw (tests/test_shared_memory.py reads it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed.comm.comm as ds_comm  # noqa: E402
import torch  # noqa: E402

from swinv2.train.engine import init_distributed  # noqa: E402


def segment(rank: int) -> Path:
    """The name DeepSpeed's ``shm_initialize`` gives a rank's shared-memory all-reduce buffer (``shm_open`` names live
    in ``/dev/shm`` on Linux)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


rank, world = init_distributed()
total = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(total)
inference = torch.tensor([float(rank + 1)])
ds_comm.inference_all_reduce(inference)
print("PROBE " + json.dumps({
    "rank": rank, "world": world, "all_reduce": total.item(), "inference_all_reduce": inference.item(),
    "shm_op_loaded": ds_comm.cdb.shm_comm_op is not None, "segment_after_init": segment(rank).exists(),
}), flush=True)
