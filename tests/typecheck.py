"""The run-time checker the test run wraps the package with (``conftest.py``): beartype with PEP 484's numeric
tower (an ``int`` is a valid ``float``), jaxtyping checking the tensor shapes against the glossary."""

from beartype import BeartypeConf, beartype

checker = beartype(conf=BeartypeConf(is_pep484_tower=True))
