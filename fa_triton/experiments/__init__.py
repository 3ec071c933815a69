"""Experiments on top of the library: the founding tutorial's MNIST job (``mnist.py``) and the
``fa-triton`` command line (``cli.py``)."""
