"""The archive's base: blob stores, the index and the one ingest path. Imports nothing else of vnpacs."""
