"""``python -m gradwatch`` is the ``gradwatch`` command."""

from gradwatch.cli import main

main()
