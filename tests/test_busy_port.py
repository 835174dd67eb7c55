"""A rendezvous port that another process already listens on (``--master_port``, ``MASTER_PORT``): one sentence
naming the port and the way to pick another, exit 2 (:func:`swinv2.train.engine.init_distributed`)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from pretrain_helpers import PRETRAIN, ROOT, TIMEOUT, TINY, describe, env


@pytest.mark.slow
def test_a_busy_master_port_is_one_sentence_naming_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # What the deepspeed launcher and torchrun hand each rank: the rank's own address and port to meet at.
        ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, PRETRAIN, *TINY, f"run.output_dir={tmp_path / 'run'}"], cwd=ROOT,
                                env={**env(), **ranks}, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2, describe(result)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: port {port} on 127.0.0.1 (the rendezvous port, MASTER_PORT) is already in use, "
                           "probably by another run: pick a free one, e.g. deepspeed --master_port "), describe(result)
    assert "Traceback" not in result.stderr
