import sys

from heterodyne.cli import main

sys.exit(main())
