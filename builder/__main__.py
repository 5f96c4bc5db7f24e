"""``python -m builder`` runs the meshbake CLI."""

from builder.cli.main import main

raise SystemExit(main())
