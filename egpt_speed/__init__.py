"""egpt-speed: a four-stage inference testbed for EventGPT with pluggable Stage-4 strategies."""

__version__ = "0.1.0"
