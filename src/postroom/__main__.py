"""`python -m postroom`: the same entry point as the `postroom` console script."""

from postroom.cli import main

raise SystemExit(main())
