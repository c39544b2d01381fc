"""One module per screen of the cockpit; each is imported only when first shown (see tui.app)."""
