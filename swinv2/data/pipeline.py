"""Webdataset streams for SimMIM pretraining, fine-tuning and evaluation, and the loader that runs them.

Training streams (``kind="pretrain"`` and ``"train"``) resample shards with replacement, so every rank runs
exactly ``samples_per_epoch // batch_size`` steps per epoch whatever the shard count: no rank can run out
early and hang the others in a collective. Each (seed, rank, worker, epoch) gets its own shard sequence,
shuffle buffer order and augmentation RNG, so no two ranks or workers replay the same stream and a run is
reproducible.

The evaluation streams (``kind="eval"``, labelled, and ``"heldout"``, images only, e.g. SimMIM's held-out
reconstruction loss) read every shard once: shards go to ranks round-robin
(``urls[rank::world_size]``) and then to that rank's workers (``[worker::num_workers]``), so each sample is
seen exactly once across all ranks and workers; a rank or worker with no shard simply yields nothing.
Ranks may therefore get different numbers of samples and batches: :attr:`ShardLoader.num_samples` says how
many this rank saw, so metrics are reduced as sums (``all_reduce(sum)``, ``all_reduce(count)``) after the
loop, never with a collective per batch.

Unusable samples (corrupt or undecodable images, missing labels, unreadable shards) are skipped, counted and
logged, never fatal and never silent. Workers are separate processes, so the count travels with the batches:
each batch carries how many samples its worker skipped since its previous batch (plus the error messages),
and a worker that skips samples after its last batch sends one empty batch holding just that count. The
loader strips these fields, adds them up in the main process (:attr:`ShardLoader.skipped`) and never yields
the empty batches. Counting this way is exact, needs no shared memory and works with any start method.

Workers are persistent: forked once, they read each epoch's number (and the resume step that salts the first
epoch of a resumed run, so a crash-resume does not replay that epoch's batches) from a small shared-memory tensor
at the start of every epoch, so their streams are the ones fresh workers would run. They ignore the signals meant
for the training process (SIGTERM, SIGUSR1, SIGINT: it finishes its step and checkpoints), die with it (Linux
parent-death signal, and a parent-pid check), and :meth:`ShardLoader.close` (run on every exit, also at interpreter
exit) stops them, killing any that do not stop, so no exit path waits on a stuck worker.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import logging
import math
import os
import random
import signal
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from .config import DataConfig
from .decode import decode_image, image_bytes, label_of
from .transforms import eval_transform, train_transform
from .urls import DataError, check_readable, count_samples, expand_urls, shard_sizes

Kind = Literal["pretrain", "train", "eval", "heldout"]
KINDS = ("pretrain", "train", "eval", "heldout")
ONCE = ("eval", "heldout")  # kinds that read every shard once (no resampling, no fixed length)
log = logging.getLogger("swinv2.data")

_MAX_ERRORS_PER_BATCH = 8  # error messages carried per batch (the count is always exact)
_MAX_LOGGED_PER_EPOCH = 20  # individual warnings per epoch before they are only summarised


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torch.distributed when initialised, else $RANK/$WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size}); check RANK and WORLD_SIZE.")
    return rank, world_size


def stream_seed(seed: int, rank: int, worker: int, epoch: int, resumed_at: int = 0) -> int:
    """A 63-bit seed unique to (seed, rank, worker, epoch), and to the resume step ``resumed_at`` when not 0 (the
    first epoch of a resumed run: a fresh stream, not the one the crashed run already trained on); hashing keeps
    nearby tuples unrelated."""
    salt = f"/resumed{resumed_at}" if resumed_at else ""  # 0 keeps the seeds of runs that never resumed
    digest = hashlib.blake2b(f"{seed}/{rank}/{worker}/{epoch}{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# The shared-memory slots a stream's persistent workers read (and write: their pids, for ShardLoader.close).
_EPOCH, _RESUMED_AT, _PARENT, _PIDS = 0, 1, 2, 3
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_worker_ready_in = 0  # the pid of the worker process whose signals are already set up (forked copies differ)


def _die_with_parent(parent: int) -> None:
    """Make this worker die with the process that forked it, even if that one is killed (SIGKILL leaves no chance
    to stop its workers): Linux's parent-death signal, then a check that the parent did not die before it was set."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the per-batch parent-pid check below still ends the worker
            pass
    if os.getppid() != parent:
        os._exit(0)


def _enter_worker(parent: int) -> None:
    """Once per worker process: ignore the training process's signals and die with it."""
    global _worker_ready_in
    if _worker_ready_in == os.getpid():
        return
    # Preemption signals and Ctrl-C are for the training process, which finishes its step and checkpoints; a
    # worker dying of one would fail that step. ShardLoader.close ends the workers.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent(parent)
    _worker_ready_in = os.getpid()


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of ``total`` batches worker ``worker`` of ``num_workers`` produces (they add up to ``total``)."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


class _Tally:
    """Skips seen by one worker since its last batch, and the guard against spinning on bad data."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.pending = 0
        self.errors: list[str] = []
        self.in_a_row = 0
        self.empty_shards_in_a_row = 0

    def skip(self, where: str, exn: BaseException, count: int = 1) -> bool:
        """Count ``count`` lost samples (one event for the guard against spinning on bad data)."""
        self.pending += count
        self.in_a_row += 1
        message = f"{where}: {type(exn).__name__}: {exn}"[:300]
        if len(self.errors) < _MAX_ERRORS_PER_BATCH:
            self.errors.append(message)
        if self.in_a_row >= self.max_consecutive:
            raise RuntimeError(f"{self.in_a_row} samples in a row could not be read (last: {message}); "
                               "check the shards, or raise data.max_consecutive_errors if this is expected.")
        return True  # webdataset handlers return True to go on with the next item

    def shard_opened(self) -> None:
        self.empty_shards_in_a_row += 1
        if self.empty_shards_in_a_row > 1000:  # resampling empty shards would otherwise spin forever
            raise RuntimeError("1000 shards in a row held no sample; check that the shards are not empty.")

    def raw_sample(self) -> None:
        self.empty_shards_in_a_row = 0

    def ok(self) -> None:
        self.in_a_row = 0

    def take(self) -> tuple[int, list[str]]:
        out = self.pending, self.errors
        self.pending, self.errors = 0, []
        return out


class ShardStream(IterableDataset):
    """One rank's stream of collated batches (dicts); each DataLoader worker runs its own share of it."""

    def __init__(self, urls: list[str], kind: Kind, cfg: DataConfig, transform: Callable, rank: int,
                 world_size: int, batch_size: int, batches_per_epoch: int | None, img_size: int,
                 num_workers: int = 0):
        super().__init__()
        self.urls, self.kind, self.cfg, self.transform = urls, kind, cfg, transform
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.min_side = math.ceil(cfg.draft_factor * img_size) if cfg.draft_factor else 0
        self.shard_sizes = shard_sizes(urls)  # samples per shard (dataset.json), to count what a broken one lost
        # Persistent workers hold a copy of this stream made once: what changes per epoch lives in shared memory.
        self.shared = torch.zeros(_PIDS + max(num_workers, 1), dtype=torch.int64).share_memory_()
        self.shared[_PARENT] = os.getpid()
        self._parent = 0  # in a worker: the training process's pid, checked before every batch

    @property
    def epoch(self) -> int:
        """The data epoch the next iteration runs (set by ShardLoader before each epoch)."""
        return int(self.shared[_EPOCH])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.shared[_EPOCH] = value

    @property
    def resumed_at(self) -> int:
        """The resume step salting the next iteration's stream (0: none; see :func:`stream_seed`)."""
        return int(self.shared[_RESUMED_AT])

    @resumed_at.setter
    def resumed_at(self, value: int) -> None:
        self.shared[_RESUMED_AT] = value

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes that ran this stream (0 for a slot never used)."""
        return [int(p) for p in self.shared[_PIDS:]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, resumed_at = self.epoch, self.resumed_at  # read once: the main process may set the next epoch's
        if info is not None:
            self._parent = int(self.shared[_PARENT])
            _enter_worker(self._parent)
            self.shared[_PIDS + worker] = os.getpid()
            seed = stream_seed(self.cfg.seed, self.rank, worker, epoch, resumed_at)
            # Augmentations draw from the global RNGs; DataLoader would seed them from the main process's torch
            # RNG, which is identical on every rank when the training script seeds all ranks alike.
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        yield from self.worker_batches(worker, num_workers, epoch, resumed_at)

    def worker_batches(self, worker: int, num_workers: int, epoch: int, resumed_at: int = 0
                       ) -> Iterator[dict[str, Any]]:
        """The batches worker ``worker`` of ``num_workers`` produces in ``epoch`` (salted by ``resumed_at``); a
        DataLoader yields its workers' batches in turn (batch i from worker i % num_workers)."""
        seed = stream_seed(self.cfg.seed, self.rank, worker, epoch, resumed_at)
        tally = _Tally(self.cfg.max_consecutive_errors)
        if self.batches_per_epoch is None:
            mine = list(islice(islice(self.urls, self.rank, None, self.world_size), worker, None, num_workers))
            shards: Any = self._opened([dict(url=u) for u in mine], tally)
            limit = None
        else:
            limit = worker_share(self.batches_per_epoch, worker, num_workers)
            if limit == 0:
                return
            resampled = wds.ResampledShards(self.urls, seed=seed, worker_seed=_no_worker_seed, deterministic=True)
            shards = self._opened(resampled, tally)
        samples = self._samples(shards, tally)
        if limit is not None and self.cfg.shuffle_buffer > 0:
            # Shuffle raw bytes before decoding: cheap to hold, and nothing is decoded only to be dropped.
            buffer = self.cfg.shuffle_buffer
            samples = wds.shuffle(buffer, initial=buffer, rng=random.Random(seed + 1))(samples)
        yield from self._batches(self._decoded(samples, tally), tally, limit)

    @staticmethod
    def _opened(shards, tally: _Tally):
        for shard in shards:
            tally.shard_opened()
            yield shard

    def _samples(self, shards, tally: _Tally) -> Iterator[dict[str, Any]]:
        """Raw samples of each shard in turn. A shard that fails (unreadable, or a tar cut short) is one error,
        counted once as the samples it did not deliver when ``dataset.json`` says how many it holds, else as 1."""
        for shard in shards:
            url, seen = shard["url"], 0
            try:
                for sample in wds.tarfile_samples([dict(url=url)]):  # webdataset re-raises: we see each failure once
                    seen += 1
                    tally.raw_sample()
                    yield sample
            except Exception as exn:  # noqa: BLE001 - any unreadable shard is skipped and counted, never fatal
                held = self.shard_sizes.get(url)
                if held is None:
                    tally.skip(f"{url}: shard unreadable after {seen} samples (how many it held is unknown: no "
                               "dataset.json lists it)", exn)
                else:
                    lost = max(held - seen, 0)
                    tally.skip(f"{url}: shard unreadable after {seen} samples, {lost} of its {held} lost", exn,
                               count=max(lost, 1))

    def _decoded(self, samples, tally: _Tally) -> Iterator[dict[str, Any]]:
        for sample in samples:
            key = sample.get("__key__", "?")
            try:
                image = decode_image(image_bytes(sample), self.min_side)
                item = {"key": key}
                if self.kind in ("train", "eval"):
                    item["label"] = label_of(sample)
                out = self.transform(image)
                if isinstance(out, (tuple, list)):  # SimMIM: (image, mask)
                    item["image"], item["mask"] = out[0], torch.as_tensor(out[1])
                else:
                    item["image"] = out
            except Exception as exn:  # any unusable sample is skipped and counted, never fatal
                tally.skip(f"{sample.get('__url__', '?')}:{key}", exn)
                continue
            tally.ok()
            yield item

    def _batches(self, items, tally: _Tally, limit: int | None) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        done = 0
        for item in items:
            if self._parent and os.getppid() != self._parent:
                return  # the training process is gone (no parent-death signal here): nobody reads our batches
            buf.append(item)
            if len(buf) == self.batch_size:
                yield _with_tally(collate(buf), tally)
                buf, done = [], done + 1
                if limit is not None and done >= limit:
                    return
        if buf:  # only evaluation streams end; their last batch may be partial
            yield _with_tally(collate(buf), tally)
        elif tally.pending:
            yield _with_tally({"key": []}, tally)


def _no_worker_seed() -> int:
    return 0  # our seed already includes rank and worker; ResampledShards would mix in its own otherwise


def _with_tally(batch: dict[str, Any], tally: _Tally) -> dict[str, Any]:
    batch["_skipped"], batch["_errors"] = tally.take()
    return batch


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts into a batch: ``image`` (B, 3, H, W), ``mask`` and ``label`` when present, ``key``."""
    # default_collate stacks straight into shared memory inside a worker, saving a copy on the way to the trainer.
    batch: dict[str, Any] = {"image": default_collate([it["image"] for it in items])}
    if "mask" in items[0]:
        batch["mask"] = default_collate([it["mask"] for it in items])
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    batch["key"] = [it["key"] for it in items]
    return batch


class ShardLoader:
    """Iterable over batches (dicts with ``image``, ``label``/``mask``, ``key``), one epoch per ``iter()``.

    Attributes after (or during) an epoch:
        epoch: the epoch the last ``iter()`` ran (``set_epoch`` picks the next one, e.g. when resuming).
        num_samples: samples this rank received in that epoch (exact; reduce it across ranks for eval metrics).
        epoch_skipped / skipped: unusable samples skipped in that epoch / since the loader was built.
        errors: the most recent skip messages.
        num_batches: batches per epoch for training streams (``len(loader)``); ``None`` for evaluation.
        expected_samples: for evaluation, this rank's sample count from ``dataset.json`` when known.
    """

    def __init__(self, stream: ShardStream, loader: DataLoader, num_batches: int | None,
                 expected_samples: int | None):
        self.stream, self.loader = stream, loader
        self.num_batches, self.expected_samples = num_batches, expected_samples
        self.epoch, self._next_epoch, self._resumed_at = -1, 0, 0
        self.num_samples = self.epoch_skipped = self.skipped = 0
        self.errors: deque[str] = deque(maxlen=50)
        _close_at_exit(self)
        weakref.finalize(self, _stop_workers, loader, stream)  # holds no reference to self

    def set_epoch(self, epoch: int, resumed_at: int = 0) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (its streams depend on (seed, rank, worker, epoch)); a
        resumed run passes its resume step as ``resumed_at`` for its first epoch, which then gets a fresh stream
        instead of replaying the batches the run already trained on before it stopped."""
        self._next_epoch, self._resumed_at = epoch, resumed_at

    def close(self) -> None:
        """Stop this loader's worker processes now (they are persistent); a later ``iter()`` starts new ones. Runs
        by itself when the loader is garbage-collected and at interpreter exit."""
        _stop_workers(self.loader, self.stream)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an evaluation stream has no fixed length; count ShardLoader.num_samples instead")
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Set before iter(self.loader), which tells the persistent workers to start the next epoch.
        self.epoch = self.stream.epoch = self._next_epoch
        self.stream.resumed_at, self._resumed_at = self._resumed_at, 0
        self._next_epoch += 1
        self.num_samples = self.epoch_skipped = 0
        for batch in self.loader:
            skipped, errors = batch.pop("_skipped"), batch.pop("_errors")
            if skipped:
                self._account(skipped, errors)
            if not batch["key"]:
                continue
            self.num_samples += len(batch["key"])
            yield batch
        if self.expected_samples is not None and self.num_samples != self.expected_samples:
            log.warning("epoch %d: this rank read %d of the %d samples its shards hold (dataset.json)", self.epoch,
                        self.num_samples, self.expected_samples)
        if self.epoch_skipped:
            log.warning("epoch %d: skipped %d unusable samples on this rank (%d so far)", self.epoch,
                        self.epoch_skipped, self.skipped)
            if self.num_samples == 0:
                raise RuntimeError(f"every sample of epoch {self.epoch} was unusable (first error: {self.errors[0]}); "
                                   "check the shards.")

    def _account(self, skipped: int, errors: list[str]) -> None:
        for message in errors:
            if self.epoch_skipped < _MAX_LOGGED_PER_EPOCH:
                log.warning("skipped unusable sample %s", message)
            self.errors.append(message)
        self.epoch_skipped += skipped
        self.skipped += skipped


_open_loaders: weakref.WeakSet[ShardLoader] = weakref.WeakSet()


def _close_at_exit(loader: ShardLoader) -> None:
    """Close ``loader`` at interpreter exit if it is still open, before multiprocessing's own exit handler (atexit
    runs the last registered first) waits for its workers: an exception, a broken stdout pipe or sys.exit never
    waits on a stuck worker."""
    if not _open_loaders:
        atexit.unregister(_close_all)
        atexit.register(_close_all)
    _open_loaders.add(loader)


def _close_all() -> None:
    for loader in list(_open_loaders):
        try:
            loader.close()
        except Exception as error:  # noqa: BLE001 - at exit: say so, and go on closing the others
            log.warning("could not stop the workers of a data loader at exit: %s", error)


def _stop_workers(loader: DataLoader, stream: ShardStream) -> None:
    """torch's own shutdown of ``loader``'s persistent workers (through a private method, when this torch has it),
    then SIGKILL for any worker left alive: ours ignore SIGTERM, and one stuck in a read would otherwise keep the
    process in multiprocessing's exit handler, which joins every worker, forever."""
    # As a finaliser this runs inside whatever code triggered the collection, e.g. under a FakeTensorMode or a
    # FLOP counter, which would intercept the reads of the shared pid slots: run with every torch mode off.
    with torch._C.DisableTorchFunction(), _disable_current_modes():
        _stop_workers_now(loader, stream)


def _stop_workers_now(loader: DataLoader, stream: ShardStream) -> None:
    iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if iterator is not None:
        loader._iterator = None
    _kill_children(stream.worker_pids())
    stream.shared[_PIDS:] = 0


def _kill_children(pids: list[int]) -> None:
    """SIGKILL those of ``pids`` that are still running children of this process (a pid of ours is not reused
    until multiprocessing reaps it, which it does when it joins the worker)."""
    import psutil

    for pid in pids:
        try:
            process = psutil.Process(pid)
            if pid and process.ppid() == os.getpid() and process.status() != psutil.STATUS_ZOMBIE:
                process.kill()
        except psutil.Error:  # already gone
            pass


def build_loader(cfg: DataConfig | Mapping[str, Any], kind: Kind = "train", transform: Callable | None = None,
                 rank: int | None = None, world_size: int | None = None, urls: str | list[str] | None = None, *,
                 img_size: int, setting: str | None = None) -> ShardLoader:
    """Build the loader for ``kind``: ``"pretrain"`` (SimMIM), ``"train"`` (fine-tuning), ``"eval"`` or
    ``"heldout"`` (unlabelled, every sample once, e.g. SimMIM's held-out loss; needs a transform).

    ``img_size`` is the model's input size (``model.img_size``): the default transforms crop to it and JPEGs are
    decoded at a reduced scale while their shorter side stays at least ``data.draft_factor`` times it.

    ``cfg`` is a :class:`DataConfig` (or a mapping / OmegaConf node of one). ``transform`` maps an RGB PIL image
    to a tensor, or to ``(image, mask)`` (SimMIM: ``simmim.PretrainTransform``); ``"pretrain"`` needs one,
    ``"train"`` defaults to timm's augmentation and ``"eval"`` to resize + centre crop. ``urls`` overrides
    ``cfg.train_urls`` / ``cfg.eval_urls``; ``setting`` names where the shards came from in messages (default
    ``data.train_urls`` / ``data.eval_urls``). ``rank`` / ``world_size`` default to torch.distributed, then
    $RANK / $WORLD_SIZE, then 0 / 1. A remote or ``pipe:`` source that gives no bytes is one sentence here, at
    start-up, rather than a traceback from a loader worker.
    """
    cfg = DataConfig.coerce(cfg)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    if not (isinstance(img_size, int) and not isinstance(img_size, bool) and img_size >= 16):
        raise ValueError(f"img_size must be the model's input size, an integer of at least 16, got {img_size!r}.")
    rank, world_size = resolve_rank(rank, world_size)
    field = "eval_urls" if kind in ONCE else "train_urls"
    spec = urls if urls is not None else getattr(cfg, field)
    setting = setting or f"data.{field}"
    if not spec:
        raise DataError(f"{setting} is empty; set it to shards such as shards/train-{{000000..000099}}.tar, "
                         f"a folder of shards, or demo:{'val' if kind in ONCE else 'train'}.")
    shard_urls = expand_urls(spec)
    check_readable(shard_urls, setting)
    if transform is None:
        if kind in ("pretrain", "heldout"):
            raise ValueError(f"kind={kind!r} needs transform=simmim.PretrainTransform(...) (or simmim.HeldOutTransform "
                             "for kind='heldout').")
        transform = train_transform(cfg, img_size) if kind == "train" else eval_transform(cfg, img_size)

    if kind in ONCE:
        batch_size = cfg.eval_batch_size or cfg.batch_size
        num_batches = None
        expected = count_samples(list(islice(shard_urls, rank, None, world_size)))
    else:
        batch_size, expected = cfg.batch_size, None
        per_rank = cfg.samples_per_epoch
        if per_rank == 0:
            total = count_samples(shard_urls)
            if total is None:
                raise DataError("data.samples_per_epoch is 0 but the data set size is unknown (no dataset.json "
                                 "lists these shards); set data.samples_per_epoch to the samples per rank per epoch.")
            per_rank = total // world_size
        num_batches = per_rank // batch_size
        if num_batches == 0:
            raise DataError(f"an epoch of {per_rank} samples per rank is less than one batch of {batch_size}; "
                             "raise data.samples_per_epoch or lower data.batch_size.")

    workers = cfg.num_workers
    stream = ShardStream(shard_urls, kind, cfg, transform, rank, world_size, batch_size, num_batches, img_size,
                         workers)
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream batches inside each worker
        num_workers=workers,
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,  # forked once; each epoch's number reaches them through stream.shared
        timeout=cfg.timeout_s if workers > 0 else 0,
    )
    return ShardLoader(stream, loader, num_batches, expected)
