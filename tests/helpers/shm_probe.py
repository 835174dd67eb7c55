"""Run under ``deepspeed --num_gpus N``: joins the process group through swinv2's ``init_distributed``, all-reduces
once, and prints one JSON line per rank with what it saw (tests/test_shared_memory.py reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed.comm.comm as ds_comm  # noqa: E402
import torch  # noqa: E402

from swinv2.train.engine import cpu_allreduce_segment, init_distributed  # noqa: E402

rank, world = init_distributed()
total = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(total)
print("PROBE " + json.dumps({
    "rank": rank, "world": world, "all_reduce": total.item(),
    "shm_op_loaded": ds_comm.cdb.shm_comm_op is not None,
    "segment_after_init": cpu_allreduce_segment(rank).exists(),
}), flush=True)
