"""`python -m ftte_agent`: the same as the `ftte-agent` command."""
from .cli import main

main()
