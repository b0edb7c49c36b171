"""`python -m webui`: hands the command line to the composition root.
Must not do any work itself."""

import sys

from webui.main import main

sys.exit(main(sys.argv[1:]))
