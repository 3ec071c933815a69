"""Deprecated path: the FA family's rules are ``fa_triton.rules.methods`` (and Philox is
``fa_triton.rules.philox``)."""

import warnings

from .rules.methods import *  # noqa: F401,F403
from .rules.methods import FeedbackRule, feedback_matrix, init_bound, init_std, random_magnitudes, rule_for  # noqa: F401
from .rules.philox import philox_uniform  # noqa: F401

warnings.warn("fa_triton.methods is deprecated: use fa_triton.rules.methods (and fa_triton.rules.philox)",
              DeprecationWarning, stacklevel=2)
