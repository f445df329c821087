"""`localflow demo` and `localflow demo-sources` (defined in pipeline/embedded/demo.py)."""

from pipeline.cli.app import app
from pipeline.embedded.demo import demo_command, demo_sources_command

app.command("demo")(demo_command)
app.command("demo-sources")(demo_sources_command)
