"""``python -m dkv``: the ``dkv`` command."""

from dkv.services.cli import main

raise SystemExit(main())
