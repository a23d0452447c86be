import sys

from keras_stable_heads.cli import main

sys.exit(main())
