"""Offline RL data: trajectory store, dataset loaders/writers, in-context tasks, generators.

Importing ``envs`` registers the ringrl/* Gymnasium ids (from ``envs.darkroom``). Loaders live in
submodules (``envs.datasets``, ``envs.minari_io``, ``envs.exorl``) so that importing the package
stays light.
"""

try:
    from envs import darkroom  # noqa: F401 (registers gym ids)
except ModuleNotFoundError as err:  # darkroom.py not written yet; any other missing module is real
    if err.name != "envs.darkroom":
        raise
