"""The shipped config files (ml_collections `get_config(arg)` modules), installed with the package.

On the command line name one by file path (`--config=configs/fashion_mnist_lenet5.py:method=dafl`
in a checkout, where `configs/` points here) or by its bare name from anywhere, also after
`pip install` (`--config=fashion_mnist_lenet5:method=dafl`). A config of your own starts from
the shared blocks with `from dfkd_jax.configs import common` (no path tricks needed).
"""
