import sys

from server.cli import main

if len(sys.argv) == 1:
    sys.argv.append("serve")
sys.exit(main())
