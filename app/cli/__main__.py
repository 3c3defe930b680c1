"""`python -m app.cli`: the same command line as `vramplan`."""

from app.cli import main

raise SystemExit(main())
