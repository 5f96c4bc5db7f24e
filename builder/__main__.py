"""``python -m builder`` runs the meshbake CLI."""

from builder.cli import main

raise SystemExit(main())
