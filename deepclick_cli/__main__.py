"""``python -m deepclick_cli ...``: the same commands as the ``deepclick`` console script."""

from deepclick_cli.main import app

app()
