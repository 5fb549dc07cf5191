"""bmfn: audio-visual event localization with BMFN, from raw video to per-second labels."""

__version__ = "0.1.0"

import warnings as _warnings

# resampy 0.2.2 (pinned: it reproduces the AVE-era audio, features-reference.md 2.1) imports the deprecated
# pkg_resources; its warning would greet every command.
_warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
