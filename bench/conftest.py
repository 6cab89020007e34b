import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # the suites import the bench scripts as modules
