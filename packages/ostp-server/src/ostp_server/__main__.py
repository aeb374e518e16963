"""`python -m ostp_server`: the same as the `ostp-server` command."""

import sys

from ostp_server.cli import main

sys.exit(main())
