"""The Hydra configs, installed as the package phi4.conf (setup.py maps it to this folder), so that
the entry points find them through the installed package: phi4.conf_dir()."""
