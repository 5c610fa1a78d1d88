"""``python -m pqproxy``."""

from .cli import main

raise SystemExit(main())
