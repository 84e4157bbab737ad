"""`python -m miselbo.pipeline`: the main job (miselbo.pipeline.run)."""
import sys

from miselbo.pipeline.run import main

sys.exit(main())
