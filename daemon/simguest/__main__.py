import sys

from daemon.simguest.cli import main

sys.exit(main())
