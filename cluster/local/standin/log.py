"""The stand-in's one logger (its name is what the CLI's log lines show)."""

import logging

log = logging.getLogger("cluster_local")
