"""Write an image folder or file list as webdataset shards with a dataset.json index.

    python launch/make_shards.py SRC OUT_PATTERN [--max-samples N] [--resize N] ...
    python launch/make_shards.py --help

The same as the ``swinv2-make-shards`` console command; the code is ``swinv2.commands.make_shards.main``.
"""

from swinv2.commands.make_shards import main

if __name__ == "__main__":
    raise SystemExit(main())
