"""This repository's doit tasks are the ones every user gets: they ship with the package."""
from chroma_resume.doit_tasks import *  # noqa: F403  build, verify, resume-status, clean-wal, repair, cache-*, crash-matrix

DOIT_CONFIG = {"default_tasks": ["build"], "backend": "sqlite3", "dep_file": ".doit.db"}
