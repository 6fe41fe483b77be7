"""Where installs made before the move to ``control/apps/`` look for the ``drover`` command.

The CLI lives in :mod:`control.apps.cli` (``[project.scripts]`` names it); an environment installed earlier
has a ``drover`` script that imports ``control.cli:app``, and older scripts run ``python -m control.cli``.
Both keep working through this module until the environment is reinstalled.
"""

from control.apps.cli import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
