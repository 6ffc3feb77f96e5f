"""``python -m dkv``: the ``dkv`` command."""

from dkv.cli import main

raise SystemExit(main())
