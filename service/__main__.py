"""`python -m service` runs the `custody` command line."""

from .cli import main

raise SystemExit(main())
