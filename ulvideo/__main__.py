import sys

from ulvideo.cli import main

sys.exit(main())
