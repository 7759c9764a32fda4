import sys

from machines.providers.local.cli import main

sys.exit(main())
