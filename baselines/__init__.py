"""Reference Stage-4 decoder and the decoupled four-stage runner."""
