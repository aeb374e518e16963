"""`python -m ostp_tui`: the same as the `ostp-tui` command."""

from ostp_tui.app import main

main()
