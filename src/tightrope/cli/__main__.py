"""`python -m tightrope.cli ...`."""

from tightrope.cli import app

app()
