import sys

from spikelm.commands.main import main

sys.exit(main())
