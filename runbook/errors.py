"""The error every bad input raises: the message names the file, the YAML path and what to do."""


class InventoryError(Exception):
    """hosts.yml (or --hosts) is wrong; the message says where and what to do."""
