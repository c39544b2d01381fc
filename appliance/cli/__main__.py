"""`python -m appliance.cli` (as before the CLI became a package; `python -m appliance` is the same)."""

from appliance.cli import main

raise SystemExit(main())
