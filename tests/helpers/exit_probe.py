"""``launch/pretrain.py`` with two test probes, run as a real subprocess by tests/test_interrupts.py.

``PROBE_KEYS=1`` prints ``KEYS <epoch> <key> <key> ...`` for every training batch the step loop takes (webdataset
``__key__``s), so a test can compare the data of a run and of its resume. ``PROBE_RAISE_AT=N`` makes the N-th
training forward raise (a crash inside ``compute_loss``: a bug, so a traceback and exit 1 are expected).
"""

from __future__ import annotations

import os
import sys

import simmim.pretrain
from simmim.commands.pretrain import main
from swinv2.data.pipeline import ShardLoader

_iterate = ShardLoader.__iter__
_normalize = simmim.pretrain.normalize_images
_calls = 0


def _keys_printed(self: ShardLoader):
    for batch in _iterate(self):
        if self.num_batches is not None:  # the training stream, not an evaluation one
            print(f"KEYS {self.epoch} {' '.join(batch['key'])}", flush=True)
        yield batch


def _raising(images, dtype):
    global _calls
    _calls += 1
    if _calls == int(os.environ["PROBE_RAISE_AT"]):
        raise RuntimeError(f"probe: forward {_calls} fails")
    return _normalize(images, dtype)


if __name__ == "__main__":
    if os.environ.get("PROBE_KEYS"):
        ShardLoader.__iter__ = _keys_printed
    if os.environ.get("PROBE_RAISE_AT"):
        simmim.pretrain.normalize_images = _raising
    sys.exit(main(sys.argv[1:]))
