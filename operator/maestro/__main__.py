"""Allow ``python -m maestro``."""

from maestro.cli.main import main

main()
