"""``python -m pagedtensor``: the ``pagedllm`` command (:mod:`pagedtensor.cli`), for an environment
whose scripts folder is not on ``PATH``."""

from pagedtensor.cli import main

raise SystemExit(main())
