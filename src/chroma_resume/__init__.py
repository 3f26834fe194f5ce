"""chroma-resume: crash-safe, incremental builds of Chroma indexes with FlagEmbedding.

`chroma_resume.build(...)`, `.verify(...)`, `.query(...)` and `.status(...)` are the Python API (api.py).
The engine modules `build`, `query`, `status` and `verify` are imported first, on purpose: Python binds a submodule to its
package's attribute of the same name the first time it is imported, so importing them later would replace
the API's `chroma_resume.build` with the module. Code that wants the modules imports from them
(`from chroma_resume.build import build`).
"""
from . import build as _build_module  # noqa: F401  (see above: bound before the API's names)
from . import query as _query_module  # noqa: F401
from . import status as _status_module  # noqa: F401
from . import verify as _verify_module  # noqa: F401
from .api import build, query, status, verify  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["build", "verify", "query", "status", "__version__"]
