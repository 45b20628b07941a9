"""Stage-4 strategies: one module each, plus the registry (`strategies.registry`)."""
