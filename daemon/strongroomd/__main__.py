import sys

from strongroomd.main import main

sys.exit(main())
