import sys

from atelier.models.pull import main

if __name__ == "__main__":
    sys.exit(main())
