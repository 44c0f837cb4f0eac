# The entry model's code lives in the installed package (chorus.backends.triton_model); this file only points at it.
from chorus.backends.triton_model import TritonPythonModel  # noqa: F401
