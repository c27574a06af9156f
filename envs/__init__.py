"""Offline RL data: trajectory store, dataset loaders/writers, in-context tasks, generators.

Importing ``ringrl.envs`` registers the ringrl/* Gymnasium ids (from ``ringrl.envs.darkroom``).
Loaders live in submodules (``datasets``, ``minari_io``, ``exorl``) so that importing the package
stays light.
"""

from ringrl.envs import darkroom  # noqa: F401 (registers gym ids)
