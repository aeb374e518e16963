"""`python -m ostp_client`: the same as the `ostp-client` command."""

import sys

from ostp_client.cli import main

sys.exit(main())
