"""Triton device code (``@triton.jit`` only): the repository's top-level ``kernels/`` folder.

``kernels/`` has no ``__init__.py`` on purpose. Whenever the repository root is on ``sys.path``
(pytest, ``python -m align_ti...`` started there), a regular package named ``kernels`` there
would shadow the environment's own ``kernels`` (Hugging Face's kernel hub, which transformers
imports); a folder without ``__init__.py`` is only an implicit namespace portion, which loses to
any regular package found later on the path.

So this package is where ``align_ti.kernels`` lives: a wheel or ``pip install .`` copies the
modules of ``kernels/`` in beside this file (setup.py's build_py); in a source checkout (an
editable install, or the repository root on ``sys.path``) they stay at the root and are found
there through ``__path__``.
"""
import os

_here = os.path.dirname(os.path.abspath(__file__))
if not any(name.endswith(".py") and name != "__init__.py" for name in os.listdir(_here)):
    __path__.append(os.path.join(os.path.dirname(os.path.dirname(_here)), "kernels"))
