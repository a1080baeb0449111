"""C++ kernels for XLA:CPU (XLA FFI), compiled on first use (build.py)."""
