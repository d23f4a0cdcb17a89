"""``python -m distdet`` runs the command line."""
import sys

from distdet.cli import main

sys.exit(main())
