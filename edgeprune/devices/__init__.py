"""Where benchmarks run, as data and transport: device profiles, the SSH connection, checks, wheels.

* ``profile``: :class:`DeviceProfile`, read from packaged (``profiles/*.json``) and user JSON files;
* ``connect``: opening an SSH connection to a board (paramiko; see there for why);
* ``check``: what ``edgeprune devices check`` asks a board and how it judges the answer;
* ``wheelhouse``: the wheels a board without internet installs edgeprune from.

The runners (local, SSH, the board agent) live in :mod:`edgeprune.runners`, which imports
this package, never the other way round. Nothing here imports paramiko or onnxruntime at
import time.
"""
from __future__ import annotations

from edgeprune.devices.profile import DeviceProfile, list_profiles, load_profile, user_profile_dir

__all__ = ["DeviceProfile", "list_profiles", "load_profile", "user_profile_dir"]
