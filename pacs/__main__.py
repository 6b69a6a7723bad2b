"""`python -m pacs` runs the `vnpacs` command line."""

from pacs.cli import app

app()
