import sys

from refllama.cli import main

sys.exit(main())
