"""A CPU run creates nothing in ``/dev/shm``.

DeepSpeed's CPU accelerator builds a shared-memory all-reduce op and creates a 66 MB segment per rank under the
``deepspeed`` launcher that it never unlinks: every 2-rank run leaked 132 MB, and the suite's few hundred runs took
a 24 GB CI machine out of memory. ``swinv2.train.engine.init_distributed`` keeps DeepSpeed from building the op
(only tensor-parallel inference uses it), so no segment exists and both all-reduces still work.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pretrain_helpers import BIN, ROOT, describe, free_port, run


@pytest.mark.slow
def test_deepspeed_cpu_run_leaves_no_shared_memory_segment():
    port = free_port()
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                  str(ROOT / "tests" / "helpers" / "shm_probe.py")])
    assert result.returncode == 0, describe(result)
    # The two ranks share the launcher's stdout, so their lines can run together.
    probes = sorted((json.loads(found) for found in re.findall(r"PROBE (\{[^}]*\})", result.stdout)),
                    key=lambda p: p["rank"])
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world"] == 2 for p in probes), describe(result)
    # DeepSpeed built no shared-memory op, both all-reduces work without it, and no segment exists, during the run
    # or after it (with the op, DeepSpeed leaves one per rank: this test failed before the change).
    assert not any(p["shm_op_loaded"] for p in probes), probes
    assert all(p["all_reduce"] == p["inference_all_reduce"] == 3.0 for p in probes), probes
    assert not any(p["segment_after_init"] for p in probes), probes
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
