"""The model side of the build: checkpoint layouts (``checkpoint``), vision tower families (``towers``) and the
encoder the exporter traces (``encoder``: tower + reducer + projector)."""
