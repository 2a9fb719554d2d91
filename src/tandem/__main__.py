"""``python -m tandem`` is the ``tandem`` command."""

from tandem._private.cli import main

main()
