"""``python -m tandem`` is the ``tandem`` command."""

from tandem._private.cli.main import main

main()
