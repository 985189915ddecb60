import os
import sys

from minialign.base.dist import launched_world
from minialign.cli import main

code = main()
if launched_world() > 1:
    # Under torchrun, a gloo thread left inside torch can abort the interpreter's teardown ("terminate called
    # without an active exception") after the process group is gone. Every file is closed by now: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
