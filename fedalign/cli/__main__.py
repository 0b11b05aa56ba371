"""``python -m fedalign.cli``: the ``fedalign`` command."""

from fedalign.cli.main import main

raise SystemExit(main())
