from sdserver.cli import app

app()
