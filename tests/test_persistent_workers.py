"""Persistent DataLoader workers (forked once, each epoch's number through shared memory) give the streams fresh
workers gave; a resume salts its first epoch; workers stop on close, on garbage collection and with their parent."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys

import psutil
import pytest
import torch
from helpers.pretrain_helpers import ROOT, env
from torch._subclasses.fake_tensor import FakeTensorMode

from swinv2.data import build_loader
from swinv2.data.pipeline import stream_seed

CFG = dict(train_urls="demo:train", num_workers=2, batch_size=4, samples_per_epoch=32, shuffle_buffer=16)


def _loader(**changes):
    return build_loader({**CFG, **changes}, "pretrain", lambda image: torch.zeros(1), 0, 1, img_size=32)


def _reference(loader, epoch: int, resumed_at: int = 0) -> list[list[str]]:
    """The epoch's keys from the stream function itself, worker by worker; a DataLoader takes them in turn."""
    per_worker = [[b["key"] for b in loader.stream.worker_batches(w, 2, epoch, resumed_at)] for w in range(2)]
    return [per_worker[i % 2][i // 2] for i in range(len(loader))]


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_stream_seed_without_a_resume_is_the_one_runs_always_had():
    digest = hashlib.blake2b(b"7/1/2/3", digest_size=8).digest()
    assert stream_seed(7, 1, 2, 3) == stream_seed(7, 1, 2, 3, 0) == int.from_bytes(digest, "little") >> 1
    assert stream_seed(7, 1, 2, 3, resumed_at=40) != stream_seed(7, 1, 2, 3)


def test_persistent_workers_run_each_epochs_own_stream_and_a_resume_a_fresh_one():
    loader = _loader()
    epochs = [[b["key"] for b in loader] for _ in range(2)]
    pids = loader.stream.worker_pids()
    assert epochs == [_reference(loader, 0), _reference(loader, 1)] and epochs[0] != epochs[1]
    loader.set_epoch(0, resumed_at=5)
    resumed = [b["key"] for b in loader]
    assert loader.stream.worker_pids() == pids and len(set(pids)) == 2  # the same two processes all along
    assert resumed == _reference(loader, 0, resumed_at=5) and resumed != epochs[0]
    again = [b["key"] for b in loader]  # the salt is for the resumed epoch only: epoch 1 is epoch 1
    assert again == epochs[1]
    loader.close()
    assert _alive(pids) == []


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a failing finaliser
def test_workers_stop_when_the_loader_is_collected():
    loader = _loader()
    batches = iter(loader)
    next(batches), next(batches)  # batch i comes from worker i % 2: both have started (and written their pid)
    pids = loader.stream.worker_pids()
    assert len(_alive(pids)) == 2
    # The generator holds the loader. A collection can run the finaliser inside any code: here under a fake-tensor
    # mode, which once made its torch reads of the shared pid slots fail and leave both workers running.
    with FakeTensorMode():
        del batches, loader
        gc.collect()
    psutil.wait_procs([psutil.Process(p) for p in _alive(pids)], timeout=30)
    assert _alive(pids) == []


PARENT = """
import sys, time, torch
from swinv2.data import build_loader
loader = build_loader(dict(train_urls="demo:train", num_workers=2, batch_size=4, samples_per_epoch=32), "pretrain",
                      lambda image: torch.zeros(1), 0, 1, img_size=32)
batches = iter(loader)
next(batches), next(batches)  # one batch from each worker: both pids are written
print(*loader.stream.worker_pids(), flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # a subprocess start
def test_workers_die_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(_alive(pids)) == 2
    finally:
        os.kill(parent.pid, signal.SIGKILL)  # no chance to stop its workers itself
        parent.wait()
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in _alive(pids)], timeout=30)
    assert alive == []


CRASH = """
import torch
from swinv2.data import build_loader
loader = build_loader(dict(train_urls="demo:train", num_workers=2, batch_size=4, samples_per_epoch=32), "pretrain",
                      lambda image: torch.zeros(1), 0, 1, img_size=32)
batches = iter(loader)
next(batches)
print(*loader.stream.worker_pids(), flush=True)
raise RuntimeError("a bug while the loader's workers are up")
"""


@pytest.mark.slow  # a subprocess start
def test_an_exception_with_live_workers_exits_and_leaves_none_behind():
    # Workers ignore SIGTERM (it is for the training process), so multiprocessing's exit handler, which SIGTERMs and
    # joins every worker still up at exit, used to wait for ever here.
    crash = subprocess.Popen([sys.executable, "-c", CRASH], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pids = [int(p) for p in crash.stdout.readline().split()]
        _, err = crash.communicate(timeout=60)
    finally:
        if crash.poll() is None:
            os.killpg(crash.pid, signal.SIGKILL)
            crash.wait()
    assert crash.returncode == 1 and "a bug while the loader's workers are up" in err, err[-2000:]
    assert len(pids) == 2 and _alive(pids) == []
