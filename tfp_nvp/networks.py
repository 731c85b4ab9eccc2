"""`tfp_nvp.networks`: the name under which the package's Keras networks were first published.

The networks live in `tfp_nvp.nn`; this module re-exports them so existing imports keep working.
"""

from tfp_nvp.nn import *  # noqa: F401,F403
from tfp_nvp.nn import __all__  # noqa: F401
