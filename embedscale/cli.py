"""`embedscale <job> [hydra overrides]`: dispatch only. The jobs and their one-line docs are the registry's
(embedscale/jobs/__init__.py); each job module composes its own config (embedscale/jobs/launch.py).

The CLI imports only Hydra and `embedscale.config` before the config is composed and validated, so a typo or a
bad value fails in about a second; torch, transformers and Lightning load only after that.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from embedscale.jobs import JOBS


def _usage() -> str:
    lines = ["usage: embedscale <job> [key=value ...]   (Hydra overrides; --help after the job lists the config)", ""]
    lines += [f"  {name:<10} {job.doc}" for name, job in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"embedscale: unknown job {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from embedscale.jobs.launch import set_launch_argv

    module = importlib.import_module(JOBS[name].module)
    set_launch_argv([sys.argv[0], name, *rest])
    sys.argv = [sys.argv[0], *rest]  # Hydra parses sys.argv[1:] as overrides
    return module.main()


if __name__ == "__main__":
    main()
