import sys

from weight_mapper.cli import main

sys.exit(main())
