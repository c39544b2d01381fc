"""`python -m appliance` runs the same entry point as the `appliance` console script."""

from appliance.cli import main

raise SystemExit(main())
